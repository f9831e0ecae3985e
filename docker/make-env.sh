#!/bin/sh
# Write a local .env for docker-compose with strong random secrets, once: an existing .env is
# never overwritten. Also writes secrets/api-tokens (name:sha256hex) for one token, printed
# here once and stored nowhere in plaintext.
set -eu
cd "$(dirname "$0")/.."
if [ -e .env ]; then
    echo ".env exists; not overwriting it" >&2
    exit 1
fi
random() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
mkdir -p secrets
token="$(random)"
printf 'operator:%s\n' "$(printf '%s' "$token" | sha256sum | cut -d' ' -f1)" > secrets/api-tokens
cat > .env <<ENV
REDIS_PASSWORD=$(random)
MINIO_ROOT_USER=featuremaps-admin
MINIO_ROOT_PASSWORD=$(random)
FEATUREMAPS_S3_ACCESS_KEY=featuremaps-service
FEATUREMAPS_S3_SECRET_KEY=$(random)
FEATUREMAPS_API_TOKENS_FILE=./secrets/api-tokens
ENV
echo "wrote .env and secrets/api-tokens; the API token (shown once) is:"
echo "  $token"
