# Shared by tools/check_dist.sh and tools/wheel_check.sh (sourced): a work folder removed on exit (kept
# and printed when $KEEP is 1), timed steps and quiet logged commands, every line prefixed with $CHECK.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/qaconv-$CHECK.XXXXXX")"
if [[ "${KEEP:-0}" == 1 ]]; then echo "$CHECK: work folder $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
t0=$SECONDS
step() { echo "$CHECK: $* ($((SECONDS - t0)) s)"; }
fail() { echo "$CHECK: FAIL: $*" >&2; exit 1; }
run_logged() {  # run_logged LOG CMD...: quiet on success, the log's tail on failure
  local log=$1; shift
  if ! "$@" > "$log" 2>&1; then tail -40 "$log" >&2; fail "$* (log: $log)"; fi
}
