# Sourced by scripts/pipeline and scripts/test before they change directory: a relative LLM_MIRROR_DIR
# or TIKTOKEN_CACHE_DIR means the caller's working directory, and stages run elsewhere (DVC runs them in
# a temporary copy for `dvc exp`, the tests in temporary repositories), so make them absolute once.
for var in LLM_MIRROR_DIR TIKTOKEN_CACHE_DIR; do
    if [ -n "${!var:-}" ]; then
        export "$var=$(realpath -m -- "${!var}")"
    fi
done
