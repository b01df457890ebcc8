#!/bin/sh
# Creates the webhook secrets stack.yml mounts, once: random 32-byte hex tokens in
# deploy/secrets/ (or the directory given as $1 / $DROVER_SECRETS_DIR). Existing files are
# kept. The files hold secrets: never commit them (deploy/secrets/.gitignore).
#
#   deploy/gen-secrets.sh                 # then: docker stack deploy -c stack.yml home
#   deploy/gen-secrets.sh /tmp/s && DROVER_SECRETS_DIR=/tmp/s docker stack deploy ...
#
# Give the same values to Docker Hub (as ?token=... in the webhook URL), to GitHub (the
# webhook's secret) and to your CI (the key it signs with). drover-cluster-key stays
# inside the cluster: drover's instances sign and check their agent requests with it.
# ops-token guards the operator endpoints (status page, /jobs, /metrics): send it as
# `Authorization: Bearer TOKEN`; the shipped Prometheus scrapes drover with it.
# git-token is a placeholder: with stacks from git (deploy/drover.yml), put your git
# server's access token there (TOKEN, or USER:TOKEN).
set -eu
dir="${1:-${DROVER_SECRETS_DIR:-$(dirname "$0")/secrets}}"
mkdir -p "$dir"
umask 077
for name in dockerhub-token github-secret ci-secret drover-cluster-key ops-token git-token; do
    if [ ! -s "$dir/$name" ]; then
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$dir/$name"
        echo "created $dir/$name"
    fi
done
