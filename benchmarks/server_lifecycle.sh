# Sourced by the benchmark scripts that start servers one after another (busy_machine.sh, images.sh): waiting for
# the server in $server (a pid) to answer on $PORT, and stopping it with every process it started. Each script
# starts its own servers; these are the parts they share. $out: where the server's log ($out/NAME.log) is.

wait_ready() {  # NAME: until the server answers /v1/models (10 minutes at most: vLLM takes minutes)
  for ((waited = 0; waited < 600; waited += 5)); do
    if curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null; then echo "$(date +%T) $1 ready" >&2; return; fi
    kill -0 "$server" 2>/dev/null || { echo "$1 exited: $out/$1.log" >&2; tail -5 "$out/$1.log" >&2; exit 1; }
    ((waited % 30 == 0)) && echo "$(date +%T) waiting for $1 (${waited} s)" >&2
    sleep 5
  done
  echo "$1 not ready after 600 s: $out/$1.log" >&2; exit 1
}

stop() {  # the server and every process it started
  pkill -INT -P "$server" 2>/dev/null || true
  kill -INT "$server" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$server" 2>/dev/null || break; sleep 1; done
  pkill -KILL -P "$server" 2>/dev/null || true
  kill -KILL "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}
