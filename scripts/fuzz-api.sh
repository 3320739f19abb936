#!/usr/bin/env bash
# Fuzzes the HTTP API from its own OpenAPI document with schemathesis: a daemon on a scratch store
# (a volume with checkpoints, a token), then generated requests for every operation, checking
# that none gets a 5xx and that every response (status, content type, headers, body) matches the
# document. Tokens, read-only writes and origins are covered by crates/cairn-http/tests/security.rs.
# CI runs a short pass; API_FUZZ_EXAMPLES=500 ./scripts/fuzz-api.sh runs a long one.
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${API_FUZZ_EXAMPLES:-30}
cairn=./target/release/cairn
[ -x "$cairn" ] || cargo build --release -q -p cairn-cli
work=$(mktemp -d)
pid=
cleanup() {
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
store=$work/store
$cairn --store "$store" init >/dev/null
$cairn --store "$store" volume create v --size 16M >/dev/null
$cairn --store "$store" checkpoint create v@a -m '<b>fuzz</b>' >/dev/null
$cairn --store "$store" checkpoint create v@b >/dev/null
token=$($cairn --store "$store" token create fuzz 2>/dev/null)
$cairn --store "$store" serve --http 0 --vms-on-exit stop 2>"$work/serve.log" &
pid=$!
for _ in $(seq 100); do
    url=$(sed -n 's#.*HTTP API and web UI on \(http://[0-9.:]*\)/.*#\1#p' "$work/serve.log")
    [ -n "$url" ] && break
    sleep 0.1
done
[ -n "$url" ] || { cat "$work/serve.log" >&2; echo "fuzz-api: the daemon did not start" >&2; exit 1; }
# The coverage phase is skipped: schemathesis' own generator crashes on the operation schema's
# depth under Python 3.11 (a SystemError inside hypothesis' lambda printing, not a finding).
# Server-sent event streams never end, so they are left out.
if ! st run "$url/api/openapi.json" \
    -H "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,unsupported_method \
    --phases examples,fuzzing,stateful \
    --max-examples "$examples" --workers 2 --seed 1 \
    --exclude-path-regex '/(events/stream|jobs/\{id\}/events|console/stream)' >"$work/st.out" 2>&1; then
    cat "$work/st.out"
    echo "fuzz-api: schemathesis found a failure (above); the daemon's log: $work/serve.log" >&2
    trap - EXIT
    exit 1
fi
echo "fuzz-api: $(grep -E '[0-9]+ generated,' "$work/st.out" | tr -s ' ')"
