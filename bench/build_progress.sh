# Sourced by bench/setup_env.sh: ff_build_progress reads pip -v's build output on stdin
# and shows what a user needs while the extension compiles (the full output goes to the log):
#  - one line per compiled file, from ninja's "[n/m] ... -c <source>" lines;
#  - the link, and compiler errors;
#  - every FASTFORMER_HEARTBEAT_S seconds (30) without output, a "still building" line,
#    because one file can take minutes on a loaded machine.
# Needs _ff_say (setup_env.sh) and FASTFORMER_REPO.
ff_build_progress() {
  local line="" partial="" done_="" last=$SECONDS every=${FASTFORMER_HEARTBEAT_S:-30} rc
  while true; do
    if IFS= read -r -t "$every" line; then
      line=$partial$line
      partial=""
      if [[ $line =~ ^[[:space:]]*\[([0-9]+/[0-9]+)\].*[[:space:]]-c[[:space:]]+([^[:space:]]+) ]]; then
        done_=${BASH_REMATCH[1]}
        last=$SECONDS
        _ff_say "  [$done_] compiled ${BASH_REMATCH[2]#"$FASTFORMER_REPO"/}"
      elif [[ $line =~ [[:space:]]-shared[[:space:]] ]]; then
        _ff_say "  linking fastformer._C"
      elif [[ $line =~ (error:|WARNING: building) ]]; then
        printf '    %s\n' "$line"
      fi
    else
      rc=$?
      if [ "$rc" -le 128 ]; then  # end of input (a last line without a newline is dropped: pip ends with one)
        break
      fi
      partial+=$line  # timed out mid-line: keep what came
      if [ -z "$done_" ]; then
        _ff_say "  ... still building (no file compiled yet; $((SECONDS - last)) s)"
      else
        _ff_say "  ... still compiling ($done_ files done; the last one $((SECONDS - last)) s ago)"
      fi
    fi
  done
}
