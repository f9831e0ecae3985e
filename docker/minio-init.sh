#!/bin/sh
# One-shot MinIO bootstrap (compose's minio-init): with the root credentials, create the
# service bucket and a service user whose policy allows that bucket and, read-only, the
# FEATUREMAPS_SOURCE_ALLOW prefixes; the API and workers only ever get the service user.
# `sh docker/minio-init.sh policy` prints the policy (the same IAM JSON works on AWS).
set -eu

policy() {
    bucket="${FEATUREMAPS_S3_BUCKET:-featuremaps}"
    printf '{\n  "Version": "2012-10-17",\n  "Statement": [\n'
    printf '    {"Sid": "ServiceBucket", "Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"], "Resource": ["arn:aws:s3:::%s"]},\n' "$bucket"
    printf '    {"Sid": "ServiceObjects", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"], "Resource": ["arn:aws:s3:::%s/*"]}' "$bucket"
    n=0
    for entry in $(printf '%s' "${FEATUREMAPS_SOURCE_ALLOW:-}" | tr ',' ' '); do
        case "$entry" in
            s3://*) url="$entry" ;;
            *) url="${entry#*=}" ;;  # name=s3://…: the service narrows it to one token
        esac
        rest="${url#s3://}"
        source_bucket="${rest%%/*}"
        prefix="${rest#"$source_bucket"}"
        prefix="${prefix#/}"
        n=$((n + 1))
        printf ',\n    {"Sid": "SourceList%d", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::%s"], "Condition": {"StringLike": {"s3:prefix": ["%s*"]}}}' "$n" "$source_bucket" "$prefix"
        printf ',\n    {"Sid": "SourceRead%d", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": ["arn:aws:s3:::%s/%s*"]}' "$n" "$source_bucket" "$prefix"
    done
    printf '\n  ]\n}\n'
}

if [ "${1:-}" = "policy" ]; then
    policy
    exit 0
fi

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${FEATUREMAPS_S3_ACCESS_KEY:?}" "${FEATUREMAPS_S3_SECRET_KEY:?}"
if [ "$FEATUREMAPS_S3_ACCESS_KEY" = "$MINIO_ROOT_USER" ]; then
    echo "FEATUREMAPS_S3_ACCESS_KEY must name a service user, not MinIO's root user" >&2
    exit 1
fi
bucket="${FEATUREMAPS_S3_BUCKET:-featuremaps}"
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$bucket"
policy > /tmp/featuremaps-service-policy.json
mc admin policy create local featuremaps-service /tmp/featuremaps-service-policy.json
mc admin user add local "$FEATUREMAPS_S3_ACCESS_KEY" "$FEATUREMAPS_S3_SECRET_KEY"
if ! mc admin user info local "$FEATUREMAPS_S3_ACCESS_KEY" | grep -q featuremaps-service; then
    mc admin policy attach local featuremaps-service --user "$FEATUREMAPS_S3_ACCESS_KEY"
fi
echo "service user $FEATUREMAPS_S3_ACCESS_KEY limited to $bucket (+ read-only sources)"
