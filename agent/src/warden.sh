# The warden: kills an agent's containers when the agent can no longer stop them itself (see
# agent/src/warden.rs). Runs as bash in a container of its own, without a network, with the engine's
# API socket at /engine.sock; $1 is the agent's id.
#
# Its stdin is the agent's attach stream, one line each:
#   RUN ATTEMPT MILLIS   that attempt's containers must be gone if nothing more is heard for MILLIS ms
#   RUN ATTEMPT done     that attempt ended; it has no deadline any more
# The end of stdin means the agent is gone (killed, crashed, its container removed, its connection to
# the engine broken): every container of the agent is killed at once and the warden exits.
set -u
agent=$1
[[ $agent =~ ^[A-Za-z0-9._-]+$ ]] || { echo "the agent id $agent cannot be a label filter" >&2; exit 2; }
socket=/engine.sock
# Deadlines by "RUN ATTEMPT", in centiseconds of /proc/uptime (monotonic: clock steps move nothing).
declare -A due=()

engine() { curl -fsS --max-time 10 --unix-socket "$socket" "$@"; }

tick() {
  local up
  read -r up _ </proc/uptime
  now=$((10#${up/./}))
}

# `kill` (SIGKILL) or `remove` (SIGKILL and remove) the running containers whose labels match every
# filter given (`key=value`), except the warden. Fails when the engine could not be asked, or one of
# them could not be ended: the caller tries again.
end_labelled() {
  local how=$1 filters listed ids id failed=0
  shift
  filters=$(printf '"%s",' "$@")
  listed=$(engine -G http://engine/containers/json --data-urlencode "filters={\"label\":[${filters%,}]}") || return 1
  ids=$(printf '%s' "$listed" | grep -o '"Id":"[0-9a-f]*"' | cut -d'"' -f4)
  for id in $ids; do
    [[ $id == "$HOSTNAME"* ]] && continue
    if [[ $how == remove ]]; then
      engine -X DELETE "http://engine/containers/$id?force=1" >/dev/null && echo "removed ${id:0:12}" || failed=1
    else
      engine -X POST "http://engine/containers/$id/kill?signal=KILL" >/dev/null && echo "killed ${id:0:12}" || failed=1
    fi
  done
  return $failed
}

if ! engine http://engine/_ping >/dev/null; then
  echo "the warden cannot reach the engine's API at $socket" >&2
  exit 2
fi
echo "warden ready"

while :; do
  tick
  wait_cs=360000
  for key in "${!due[@]}"; do
    left=$((due[$key] - now))
    if ((left <= 0)); then
      run=${key% *} attempt=${key#* }
      echo "attempt $attempt of run $run is past its deadline: killing its containers"
      if end_labelled kill "cimaster.agent=$agent" "cimaster.run=$run" "cimaster.attempt=$attempt"; then
        unset "due[$key]"
      else
        due[$key]=$((now + 20)) # the engine did not answer: again in 0.2 s
        wait_cs=20
      fi
    elif ((left < wait_cs)); then
      wait_cs=$left
    fi
  done
  printf -v timeout '%d.%02d' $((wait_cs / 100)) $((wait_cs % 100))
  if read -r -t "$timeout" run attempt millis; then
    [[ $run =~ ^[0-9a-f-]+$ && $attempt =~ ^[0-9]+$ ]] || continue
    if [[ $millis == done ]]; then
      unset "due[$run $attempt]"
    elif [[ $millis =~ ^[0-9]+$ ]]; then
      tick
      due["$run $attempt"]=$((now + millis / 10))
    fi
  elif (($? <= 128)); then
    echo "the agent is gone: removing its containers"
    for _ in {1..60}; do
      end_labelled remove "cimaster.agent=$agent" && exit 0
      sleep 0.2
    done
    exit 1
  fi
done
