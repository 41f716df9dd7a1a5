#!/usr/bin/env bash
# Start the OpenAI-compatible server on the default pair (trimmed drafter), then stream a reply.
#   bash examples/serve_curl.sh
set -euo pipefail
mlx-vocabtrim serve --port 8080 &
server=$!
trap 'kill $server' EXIT
until curl -sf http://127.0.0.1:8080/health >/dev/null; do sleep 1; done
curl -sN http://127.0.0.1:8080/v1/chat/completions -H "Content-Type: application/json" -d '{
  "messages": [{"role": "user", "content": "Write a Python function that reverses a string."}],
  "max_tokens": 96, "temperature": 0, "stream": true}'
echo
