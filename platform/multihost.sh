#!/usr/bin/env bash
# Sightline as several hosts on this one machine: each host a network namespace of its own,
# joined by veth pairs to a bridge that lives in a namespace of its own (no address is added
# outside the namespaces, and the bridge has no way out: nothing leaves the machine).
#
#   platform/multihost.sh up | down | status
#   platform/multihost.sh exec HOST -- CMD...       run CMD on HOST, with the deployment's settings
#   platform/multihost.sh kill HOST PROC [SIG]      signal PROC's process group (default KILL)
#   platform/multihost.sh stop HOST PROC | start HOST PROC
#
# Hosts and their processes:
#   edge: nginx   web1, web2: web (uvicorn)   worker: interactive, bulk (Celery)
#   svc: beat, dicom   db: postgres   redis: redis   s3: s3 (SeaweedFS)   client: (none)
#
# Where `ip netns add` is refused, or SIGHTLINE_MULTIHOST_MODE=loopback, the same processes run
# in this namespace, each host on a loopback address of its own (127.77.0.N) with the same ports;
# `status` and $DIR/state/mode say which ran.
#
# Env: SIGHTLINE_MULTIHOST_DIR (state, logs, data; default var/multihost),
#      SIGHTLINE_MULTIHOST_MODE (netns | loopback; default: netns where permitted),
#      SIGHTLINE_MULTIHOST_PREFIX (namespace names; default slmh),
#      SIGHTLINE_NGINX_CERT / SIGHTLINE_NGINX_KEY (the edge's certificate, required by `up`),
#      SIGHTLINE_MULTIHOST_MODEL (the model package to register; default var/test-cache's demo),
#      SIGHTLINE_MULTIHOST_EXTRA_ENV (a file of VAR=value lines added to every process's settings).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${SIGHTLINE_MULTIHOST_DIR:-$ROOT/var/multihost}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PREFIX=${SIGHTLINE_MULTIHOST_PREFIX:-slmh}
VENV=$ROOT/.venv/bin
PGBIN=/usr/lib/postgresql/15/bin
HOSTS=(edge web1 web2 worker svc db redis s3 client)
NETNS_SUBNET=10.231.0
LOOPBACK_SUBNET=127.77.0
STARTUP_SECONDS=${SIGHTLINE_MULTIHOST_STARTUP_SECONDS:-120}
# fixed ports: every host has its own address, so nothing clashes
PORT_EDGE=8443 PORT_WEB=8000 PORT_PG=5432 PORT_REDIS=6379 PORT_S3=8333 PORT_DICOM=11112

say() { printf 'multihost: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

mode() { cat "$DIR/state/mode" 2>/dev/null || echo none; }

host_index() {
    local i
    for i in "${!HOSTS[@]}"; do [[ ${HOSTS[$i]} == "$1" ]] && { echo $((10 + i)); return; }; done
    die "no host named $1 (hosts: ${HOSTS[*]})"
}

addr() {  # addr HOST [MODE]
    local m=${2:-$(mode)}
    if [[ $m == netns ]]; then echo "$NETNS_SUBNET.$(host_index "$1")"; else echo "$LOOPBACK_SUBNET.$(host_index "$1")"; fi
}

ns() { echo "$PREFIX-$1"; }

in_host() {  # in_host HOST CMD...: CMD on HOST (its namespace in netns mode)
    local host=$1; shift
    if [[ $(mode) == netns ]]; then ip netns exec "$(ns "$host")" "$@"; else "$@"; fi
}

# --- the network -------------------------------------------------------------------------------

netns_up() {
    local br host i
    br=$(ns br)
    ip netns add "$br" || return 1
    ip -n "$br" link set lo up || return 1
    ip -n "$br" link add br0 type bridge || return 1
    ip -n "$br" link set br0 up || return 1
    for host in "${HOSTS[@]}"; do
        i=$(host_index "$host")
        ip netns add "$(ns "$host")" || return 1
        ip -n "$(ns "$host")" link set lo up || return 1
        # both ends made inside the namespaces: nothing appears in this one, even for a moment
        ip -n "$br" link add "v$host" type veth peer name eth0 netns "$(ns "$host")" || return 1
        ip -n "$br" link set "v$host" master br0 up || return 1
        ip -n "$(ns "$host")" addr add "$NETNS_SUBNET.$i/24" dev eth0 || return 1
        ip -n "$(ns "$host")" link set eth0 up || return 1
    done
}

netns_down() {
    local host
    for host in "${HOSTS[@]}" br; do
        if ip netns list 2>/dev/null | grep -w "^$(ns "$host")" >/dev/null; then
            # whatever still runs in it (a crash left it) goes first
            local pids
            pids=$(ip netns pids "$(ns "$host")" 2>/dev/null || true)
            [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
            ip netns del "$(ns "$host")" || true
        fi
    done
}

loopback_up() {
    # 127.0.0.0/8 is all on lo already: every host's 127.77.0.N answers without adding anything
    [[ $(ip -o addr show lo 2>/dev/null) == *"inet 127.0.0.1/8"* ]]
}

# --- processes ---------------------------------------------------------------------------------

pidfile() { echo "$DIR/run/$1.$2.pid"; }
logfile() { echo "$DIR/log/$1.$2.log"; }

alive() {  # alive HOST PROC: its recorded process runs
    local pid
    pid=$(proc_pid "$1" "$2") || return 1
    kill -0 "$pid" 2>/dev/null
}

proc_pid() {
    local f
    if [[ $1/$2 == db/postgres ]]; then
        f=$DIR/data/pg/postmaster.pid
        [[ -s $f ]] && head -1 "$f" && return 0
        return 1
    fi
    f=$(pidfile "$1" "$2")
    [[ -s $f ]] && cat "$f"
}

spawn() {  # spawn HOST PROC CMD...: CMD on HOST in a session of its own, its pid in the pidfile
    local host=$1 proc=$2; shift 2
    local pf log
    pf=$(pidfile "$host" "$proc") log=$(logfile "$host" "$proc")
    rm -f "$pf"
    (
        load_env "$host"
        cd "$ROOT"
        in_host "$host" setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pf" "$@" </dev/null >>"$log" 2>&1 &
    )
    local deadline=$((SECONDS + 10))
    until [[ -s $pf ]]; do
        ((SECONDS < deadline)) || die "$host/$proc did not start (see $log)"
        sleep 0.05
    done
}

load_env() {  # the settings every process reads, as production reads them; HOST's own var dir
    set -a
    # shellcheck disable=SC1091
    . "$DIR/topology.env"
    # shellcheck disable=SC1091
    . "$DIR/secrets.env"
    [[ -n ${SIGHTLINE_MULTIHOST_EXTRA_ENV:-} && -f $SIGHTLINE_MULTIHOST_EXTRA_ENV ]] && . "$SIGHTLINE_MULTIHOST_EXTRA_ENV"
    [[ -f $DIR/extra.env ]] && . "$DIR/extra.env"
    SIGHTLINE_VAR_DIR=$DIR/data/$1
    set +a
    mkdir -p "$SIGHTLINE_VAR_DIR"
}

wait_port() {  # wait_port HOST PORT PROC-HOST PROC: something listens (asked from the client host)
    local a=$1 port=$2 host=$3 proc=$4 deadline=$((SECONDS + STARTUP_SECONDS))
    until in_host client timeout 2 bash -c "exec 3<>/dev/tcp/$a/$port" 2>/dev/null; do
        if [[ $host/$proc != db/postgres ]] && ! alive "$host" "$proc"; then
            tail -30 "$(logfile "$host" "$proc")" >&2 || true
            die "$host/$proc exited while starting"
        fi
        ((SECONDS < deadline)) || { tail -30 "$(logfile "$host" "$proc")" >&2; die "nothing listens on $a:$port"; }
        sleep 0.2
    done
}

wait_line() {  # wait_line HOST PROC TEXT: TEXT appears in the log after OFFSET bytes
    local host=$1 proc=$2 text=$3 offset=${4:-0} deadline=$((SECONDS + STARTUP_SECONDS))
    until tail -c +"$((offset + 1))" "$(logfile "$host" "$proc")" 2>/dev/null | grep -F -- "$text" >/dev/null; do
        alive "$host" "$proc" || { tail -30 "$(logfile "$host" "$proc")" >&2; die "$host/$proc exited while starting"; }
        ((SECONDS < deadline)) || { tail -30 "$(logfile "$host" "$proc")" >&2; die "$host/$proc never said '$text'"; }
        sleep 0.2
    done
}

log_size() { stat -c %s "$(logfile "$1" "$2")" 2>/dev/null || echo 0; }

celery_worker() {  # the Procfile's worker lines
    local lane=$1 queues=$2
    echo "env SIGHTLINE_WORKER_LANE=$lane $VENV/celery --quiet -A workers.celery worker -P prefork -c ${WORKER_CONCURRENCY:-1} -Q $queues -n $lane@worker --without-gossip -l info"
}

start_proc() {  # start_proc HOST PROC: start it and wait until it serves
    local host=$1 proc=$2 a offset
    a=$(addr "$host")
    alive "$host" "$proc" && { say "$host/$proc already runs"; return 0; }
    offset=$(log_size "$host" "$proc")
    case $host/$proc in
        db/postgres)
            local log
            log=$(logfile db postgres)
            touch "$log" && chown postgres "$log"
            in_host db runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DIR/data/pg" -l "$log" -w -t 60 \
                -o "-c listen_addresses=$a -p $PORT_PG -k $DIR/pgs" start >/dev/null
            wait_port "$a" "$PORT_PG" db postgres
            ;;
        redis/redis)
            mkdir -p "$DIR/data/redis"
            # appendonly: a restart keeps the queues (the database still knows what needs work)
            spawn redis redis redis-server --bind "$a" --port "$PORT_REDIS" --dir "$DIR/data/redis" \
                --save "" --appendonly yes --appendfsync everysec
            wait_port "$a" "$PORT_REDIS" redis redis
            ;;
        s3/s3)
            mkdir -p "$DIR/data/s3"
            spawn s3 s3 "$VENV/weed" mini -dir="$DIR/data/s3" -ip="$a" -ip.bind="$a" -master.telemetry=false \
                -s3.port="$PORT_S3" -bucket=sightline
            wait_port "$a" "$PORT_S3" s3 s3
            wait_bucket
            ;;
        web1/web | web2/web)
            spawn "$host" web "$VENV/uvicorn" config.asgi:application --host "$a" --port "$PORT_WEB" \
                --lifespan off --proxy-headers --forwarded-allow-ips "$(addr edge)" --no-server-header
            wait_port "$a" "$PORT_WEB" "$host" web
            ;;
        worker/interactive)
            # shellcheck disable=SC2046
            spawn worker interactive $(celery_worker interactive interactive,bulk)
            wait_line worker interactive " ready." "$offset"
            ;;
        worker/bulk)
            # shellcheck disable=SC2046
            spawn worker bulk nice -n 10 $(celery_worker bulk maintenance,bulk)
            wait_line worker bulk " ready." "$offset"
            ;;
        svc/beat)
            spawn svc beat "$VENV/celery" --quiet -A workers.celery beat -l info -s "$DIR/data/svc/celerybeat-schedule"
            wait_line svc beat '"logger": "sightline.task"' "$offset"  # its first send (JSON logs; --quiet: no banner)
            ;;
        svc/dicom)
            spawn svc dicom "$VENV/python" manage.py dicom_scp
            wait_port "$a" "$PORT_DICOM" svc dicom
            ;;
        edge/nginx)
            spawn edge nginx nginx -p "$DIR/edge" -c "$DIR/edge/nginx.conf" -e "$DIR/edge/logs/error.log" -g "daemon off;"
            wait_port "$a" "$PORT_EDGE" edge nginx
            ;;
        *) die "no process $proc on $host" ;;
    esac
}

stop_proc() {  # stop_proc HOST PROC: stopped the way its own tools stop it
    local host=$1 proc=$2 pid
    case $host/$proc in
        db/postgres)
            [[ -s $DIR/data/pg/postmaster.pid ]] || return 0
            # fast: open transactions roll back and live connections drop, as in a crash of the host
            in_host db runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DIR/data/pg" -m fast -w -t 60 stop >/dev/null || true
            ;;
        *)
            pid=$(proc_pid "$host" "$proc" 2>/dev/null) || return 0
            kill -TERM -- "-$pid" 2>/dev/null || return 0
            local deadline=$((SECONDS + 20))
            while kill -0 -- "-$pid" 2>/dev/null; do
                ((SECONDS < deadline)) || { kill -KILL -- "-$pid" 2>/dev/null || true; break; }
                sleep 0.1
            done
            rm -f "$(pidfile "$host" "$proc")"
            ;;
    esac
}

kill_proc() {  # kill_proc HOST PROC SIG: the whole process group (a worker's pool child too)
    local host=$1 proc=$2 sig=${3:-KILL} pid
    pid=$(proc_pid "$host" "$proc") || die "$host/$proc has no pid"
    if [[ $host/$proc == db/postgres ]]; then kill "-$sig" "$pid"; else kill "-$sig" -- "-$pid"; fi
}

wait_bucket() {
    local deadline=$((SECONDS + STARTUP_SECONDS)) endpoint
    endpoint="http://$(addr s3):$PORT_S3"
    until in_host client "$VENV/python" - "$endpoint" <<'PY' >/dev/null 2>&1
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="x", aws_secret_access_key="x",
             region_name="us-east-1").head_bucket(Bucket="sightline")
PY
    do
        ((SECONDS < deadline)) || die "the S3 bucket never answered (see $(logfile s3 s3))"
        sleep 0.5
    done
}

# --- up / down ---------------------------------------------------------------------------------

random_token() { head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c "${1:-48}"; }

write_topology() {
    local m=$1 h
    {
        echo "# written by platform/multihost.sh up: every host's address, every URL"
        echo "SIGHTLINE_MULTIHOST_MODE=$m"
        for h in "${HOSTS[@]}"; do echo "SIGHTLINE_HOST_${h^^}=$(addr "$h" "$m")"; done
        echo "SIGHTLINE_PUBLIC_URL=https://$(addr edge "$m"):$PORT_EDGE"
        echo "SIGHTLINE_PUBLIC_WS_URL=wss://$(addr edge "$m"):$PORT_EDGE"
        echo "SIGHTLINE_WEB_UPSTREAMS='$(addr web1 "$m"):$PORT_WEB $(addr web2 "$m"):$PORT_WEB'"
        echo "DJANGO_SETTINGS_MODULE=config.settings.production"
        echo "ALLOWED_HOSTS=$(addr edge "$m"),sightline.test,localhost"
        echo "CSRF_TRUSTED_ORIGINS=https://$(addr edge "$m"):$PORT_EDGE"
        echo "DJANGO_STATIC_ROOT=$DIR/static"
        echo "REDIS_URL=redis://$(addr redis "$m"):$PORT_REDIS/0"
        echo "SIGHTLINE_S3_BUCKET=sightline"
        echo "SIGHTLINE_S3_ENDPOINT_URL=http://$(addr s3 "$m"):$PORT_S3"
        echo "SIGHTLINE_S3_REGION=us-east-1"
        echo "SIGHTLINE_DICOM_HOST=$(addr svc "$m")"
        echo "SIGHTLINE_DICOM_PORT=$PORT_DICOM"
        echo "EMAIL_BACKEND=django.core.mail.backends.console.EmailBackend"
        echo "PATH=$VENV:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        echo "PYTHONUNBUFFERED=1"
        echo "SIGHTLINE_MULTIHOST_DIR=$DIR"
    } >"$DIR/topology.env"
}

write_secrets() {  # throwaway, per run; never the same twice
    local pg_password
    pg_password=$(random_token 32)
    umask 077
    {
        echo "DJANGO_SECRET_KEY=$(random_token 50)"
        echo "SIGHTLINE_PSEUDONYM_KEY=$(random_token 48)"
        echo "SIGHTLINE_METRICS_TOKEN=$(random_token 48)"
        echo "SIGHTLINE_DEMO_PASSWORD=$(random_token 24)"
        echo "SIGHTLINE_S3_ACCESS_KEY_ID=sightline"
        echo "SIGHTLINE_S3_SECRET_ACCESS_KEY=$(random_token 32)"
        echo "SIGHTLINE_DB_PASSWORD=$pg_password"
        echo "DATABASE_URL=postgres://sightline:$pg_password@$(addr db):$PORT_PG/sightline"
    } >"$DIR/secrets.env"
    umask 022
}

db_init() {
    local pw
    mkdir -p "$DIR/data/pg" "$DIR/pgs"
    chown postgres: "$DIR/data/pg" "$DIR/pgs"
    chmod 700 "$DIR/data/pg"
    pw=$(mktemp)
    grep '^SIGHTLINE_DB_PASSWORD=' "$DIR/secrets.env" | cut -d= -f2- >"$pw"
    chown postgres "$pw"
    runuser -u postgres -- "$PGBIN/initdb" -D "$DIR/data/pg" -U postgres -E UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 --pwfile="$pw" >"$(logfile db initdb)" 2>&1 \
        || { rm -f "$pw"; tail -20 "$(logfile db initdb)" >&2; die "initdb failed"; }
    rm -f "$pw"
    local subnet
    if [[ $(mode) == netns ]]; then subnet="$NETNS_SUBNET.0/24"; else subnet="$LOOPBACK_SUBNET.0/24"; fi
    echo "host all all $subnet scram-sha-256" >>"$DIR/data/pg/pg_hba.conf"
    start_proc db postgres
    local password
    password=$(grep '^SIGHTLINE_DB_PASSWORD=' "$DIR/secrets.env" | cut -d= -f2-)
    in_host db runuser -u postgres -- "$PGBIN/psql" -h "$DIR/pgs" -p "$PORT_PG" -q -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE sightline LOGIN PASSWORD '$password'" -c "CREATE DATABASE sightline OWNER sightline" >/dev/null
}

manage() {  # manage HOST ARGS...: manage.py on HOST with the deployment's settings
    local host=$1; shift
    (load_env "$host"; cd "$ROOT"; in_host "$host" "$VENV/python" manage.py "$@")
}

edge_render() {
    local render=$ROOT/platform/nginx/render.sh
    [[ -x $render ]] || die "platform/nginx/render.sh is missing: the edge cannot be configured"
    [[ -n ${SIGHTLINE_NGINX_CERT:-} && -n ${SIGHTLINE_NGINX_KEY:-} ]] \
        || die "SIGHTLINE_NGINX_CERT and SIGHTLINE_NGINX_KEY must name the edge's certificate and key"
    (
        load_env edge
        SIGHTLINE_NGINX_LISTEN="$(addr edge):$PORT_EDGE" \
        SIGHTLINE_NGINX_UPSTREAMS="$SIGHTLINE_WEB_UPSTREAMS" \
        SIGHTLINE_NGINX_PROXY_BIND="$(addr edge)" \
        SIGHTLINE_NGINX_USER=www-data \
        SIGHTLINE_STATIC_ROOT="$DIR/static" \
        SIGHTLINE_MAX_REQUEST_BYTES="${SIGHTLINE_MAX_REQUEST_BYTES:-536870912}" \
            in_host edge "$render" "$DIR/edge" >"$(logfile edge render)" 2>&1
    ) || { cat "$(logfile edge render)" >&2; die "render.sh failed"; }
    # its workers run as www-data: they spool to temp/ and read the static files
    chown -R www-data "$DIR/edge/temp"
    chmod -R a+rX "$DIR/static"
}

cmd_up() {
    [[ -d $DIR/state && $(cat "$DIR/state/phase" 2>/dev/null) != down ]] && { say "leftovers of an earlier run: down first"; cmd_down; }
    mkdir -p "$DIR/state" "$DIR/run" "$DIR/log" "$DIR/data"
    echo starting >"$DIR/state/phase"
    local m=${SIGHTLINE_MULTIHOST_MODE:-}
    if [[ -z $m || $m == netns ]]; then
        if netns_up 2>"$DIR/log/netns.log"; then
            m=netns
        else
            [[ $m == netns ]] && { cat "$DIR/log/netns.log" >&2; netns_down; die "network namespaces refused"; }
            say "network namespaces refused ($(head -1 "$DIR/log/netns.log")): loopback mode"
            netns_down
            m=loopback
        fi
    fi
    [[ $m == loopback ]] && { loopback_up || die "no loopback interface"; }
    echo "$m" >"$DIR/state/mode"
    write_topology "$m"
    write_secrets
    say "mode $m; topology in $DIR/topology.env"
    db_init
    start_proc redis redis
    start_proc s3 s3
    say "migrating, collecting static files, registering the model, seeding"
    manage web1 migrate --noinput >"$(logfile web1 migrate)" 2>&1 || { tail -30 "$(logfile web1 migrate)"; die "migrate failed"; }
    manage web1 collectstatic --noinput >"$(logfile web1 collectstatic)" 2>&1 || { tail -30 "$(logfile web1 collectstatic)"; die "collectstatic failed"; }
    local model=${SIGHTLINE_MULTIHOST_MODEL:-$ROOT/var/test-cache/sightline-demo-1.0.0.zip}
    if [[ ! -f $model ]]; then
        model=$DIR/data/sightline-demo.zip
        manage web1 build_demo_model --output "$model" >"$(logfile web1 build-model)" 2>&1 || die "build_demo_model failed"
    fi
    manage web1 register_model "$model" --alias production --validate-here >"$(logfile web1 register-model)" 2>&1 \
        || { tail -30 "$(logfile web1 register-model)"; die "register_model failed"; }
    manage web1 seed_demo >"$(logfile web1 seed)" 2>&1 || { tail -30 "$(logfile web1 seed)"; die "seed_demo failed"; }
    edge_render
    start_proc web1 web
    start_proc web2 web
    start_proc worker interactive
    start_proc worker bulk
    start_proc svc beat
    start_proc svc dicom
    start_proc edge nginx
    echo up >"$DIR/state/phase"
    cmd_status
}

cmd_down() {
    local host proc
    if [[ -f $DIR/state/mode ]]; then
        for host_proc in edge/nginx svc/dicom svc/beat worker/bulk worker/interactive web2/web web1/web s3/s3 redis/redis db/postgres; do
            stop_proc "${host_proc%/*}" "${host_proc#*/}" 2>/dev/null || true
        done
    fi
    # a crash may have left a process the pidfiles forget: anything still in a namespace goes with it
    netns_down
    # loopback mode: whatever still holds a pidfile
    for pf in "$DIR"/run/*.pid; do
        [[ -s $pf ]] && kill -KILL -- "-$(cat "$pf")" 2>/dev/null || true
    done
    # the edge's access log (upstream, status and timings of every request) stays with the others
    [[ -f $DIR/edge/logs/access.log ]] && cp "$DIR/edge/logs/access.log" "$DIR/log/edge.access.log"
    rm -rf "$DIR/run" "$DIR/data" "$DIR/pgs" "$DIR/static" "$DIR/edge" "$DIR/secrets.env"
    mkdir -p "$DIR/state"
    echo down >"$DIR/state/phase"
    say "down (logs kept in $DIR/log)"
}

cmd_status() {
    local m host_proc state
    m=$(mode)
    echo "mode: $m"
    echo "phase: $(cat "$DIR/state/phase" 2>/dev/null || echo none)"
    [[ $m == none ]] && return 0
    for host_proc in edge/nginx web1/web web2/web worker/interactive worker/bulk svc/beat svc/dicom db/postgres redis/redis s3/s3; do
        if alive "${host_proc%/*}" "${host_proc#*/}"; then state="running pid $(proc_pid "${host_proc%/*}" "${host_proc#*/}")"; else state=stopped; fi
        printf '%-20s %-16s %s\n' "$host_proc" "$(addr "${host_proc%/*}" "$m" 2>/dev/null)" "$state"
    done
}

cmd_exec() {
    local host=$1; shift
    [[ ${1:-} == -- ]] && shift
    host_index "$host" >/dev/null
    load_env "$host"
    cd "$ROOT"
    if [[ $(mode) == netns ]]; then exec ip netns exec "$(ns "$host")" "$@"; else exec "$@"; fi
}

[[ $EUID -eq 0 ]] || die "run as root (namespaces, and PostgreSQL runs as the postgres user)"
case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    exec) shift; [[ $# -ge 2 ]] || die "exec HOST -- CMD..."; cmd_exec "$@" ;;
    kill) shift; [[ $# -ge 2 ]] || die "kill HOST PROC [SIG]"; kill_proc "$@" ;;
    start) shift; [[ $# -eq 2 ]] || die "start HOST PROC"; start_proc "$@" ;;
    stop) shift; [[ $# -eq 2 ]] || die "stop HOST PROC"; stop_proc "$@" ;;
    *) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
