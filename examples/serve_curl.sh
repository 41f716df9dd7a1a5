#!/usr/bin/env bash
# Start the OpenAI-compatible server on the default pair (trimmed drafter), stream a reply, then
# ask again without streaming to see the usage and the speculation figures.
#   bash examples/serve_curl.sh
set -euo pipefail
url=http://127.0.0.1:8080
mlx-vocabtrim serve --port 8080 &
server=$!
trap 'kill $server' EXIT
until curl -sf $url/health >/dev/null; do
  kill -0 $server  # the server exited (a one-line Error says why)
  sleep 1
done
request='{"messages": [{"role": "user", "content": "Write a Python function that reverses a string."}],
          "max_tokens": 96, "temperature": 0'
curl -sN $url/v1/chat/completions -H "Content-Type: application/json" -d "$request, \"stream\": true}"
echo
curl -s $url/v1/chat/completions -H "Content-Type: application/json" -d "$request}" |
  python -c 'import json, sys; r = json.load(sys.stdin); print(r["usage"], r["speculation"], sep="\n")'
