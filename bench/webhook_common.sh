# Sourced by bench/webhook.sh and bench/webhook_instructions.sh: the hook both measure.
#
# webhook_fixture DIR    writes DIR/secret and DIR/body.json (a GitHub push) and sets
#                        $signature, the body's X-Hub-Signature-256
# webhook_config DIR PORT OPS_PORT
#                        writes DIR/drover.yml: one `kind: github` hook on 127.0.0.1:PORT,
#                        the operator listener on OPS_PORT; with OPS=0 (builds before the
#                        operator listener, e.g. cfcd1e2, which refuse `http.ops`) none
# free_port              prints a free loopback port

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

webhook_fixture() {
  local dir=$1 secret="bench-secret-$$"
  printf '%s\n' "$secret" >"$dir/secret"
  cat >"$dir/body.json" <<'JSON'
{"ref":"refs/heads/main","before":"6113728f27ae82c7b1a177c8d03f9e96e0adf246","after":"59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5","repository":{"id":1296269,"name":"hello-world","full_name":"octocat/hello-world","private":false},"pusher":{"name":"octocat","email":"octocat@example.com"},"sender":{"login":"octocat","id":1},"commits":[{"id":"59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5","message":"Update README.md","author":{"name":"octocat","email":"octocat@example.com"}}]}
JSON
  signature="sha256=$(openssl dgst -sha256 -hmac "$secret" -r <"$dir/body.json" | cut -d' ' -f1)"
}

webhook_config() {
  local dir=$1 port=$2 ops_port=$3 ops_config
  ops_config=", ops: { listen: \"127.0.0.1:$ops_port\" }"
  if [ "${OPS:-1}" = 0 ]; then ops_config=""; fi
  cat >"$dir/drover.yml" <<YML
http: { listen: "127.0.0.1:$port"$ops_config }
hooks:
  - name: github
    kind: github
    secret_file: $dir/secret
    events: [push]
    # Verified, parsed, then refused by this rule: no job, no engine call.
    allow: { ref: "refs/heads/never" }
    rate: 1000000
    action: { command: ["true"] }
YML
}
