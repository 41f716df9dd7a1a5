"""Prompt lookup: drafts copied from the context, for free.

Much of what a model writes repeats its context (code that restates a signature, extraction,
summaries, edits). When the context's last n tokens occurred before, the tokens that followed
that occurrence are a good guess for what follows now. The target verifies them like any
draft, so output stays exactly the target's.
"""

LONGEST_MATCH = 4  # suffixes from max(this, n) tokens down to n are tried, longest first


class PromptLookup:
    """An index of where every n-gram of the context ended, grown as tokens are emitted."""

    def __init__(self, ngram: int):
        self.sizes = range(max(LONGEST_MATCH, ngram), ngram - 1, -1)
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in self.sizes:
                if end >= n:
                    self.ends.setdefault(tuple(self.tokens[end - n : end]), []).append(end)

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest
        matching suffix; a match overlapping the suffix continues periodically."""
        end = len(self.tokens)
        if limit < 1:
            return []
        for n in self.sizes:
            if end <= n:
                continue
            ends = self.ends.get(tuple(self.tokens[end - n :]), [])
            if len(ends) >= 2:
                start = ends[-2]
                period = end - start
                return [self.tokens[start + i % period] for i in range(limit)]
        return []
