#!/bin/sh
# Render Sightline's nginx config into OUT_DIR, then run it there unprivileged:
#
#   platform/nginx/render.sh OUT_DIR
#   nginx -p OUT_DIR -c OUT_DIR/nginx.conf -e OUT_DIR/logs/error.log -g 'daemon off;'
#
# Writes OUT_DIR/nginx.conf (from sightline.conf.template), upstreams.conf, proxy_bind.conf,
# main.conf, mime.types, errors/ (nginx's own error answers: JSON for API paths, a page for the
# rest), logs/ and temp/; then checks the result with `nginx -t`. Only the variables below are
# substituted, so nginx's own $variables stay as they are.
#
# Required:
#   SIGHTLINE_NGINX_LISTEN       addr:port nginx listens on (HTTPS with HTTP/2), e.g. 0.0.0.0:443
#   SIGHTLINE_NGINX_UPSTREAMS    space-separated host:port of the web replicas (uvicorn)
#   SIGHTLINE_NGINX_CERT         PEM certificate chain the operator supplies
#   SIGHTLINE_NGINX_KEY          PEM private key for it (read by nginx's master process only)
#   SIGHTLINE_STATIC_ROOT        collectstatic's output (Django's STATIC_ROOT), served at /static/
#   SIGHTLINE_MAX_REQUEST_BYTES  largest request body, in bytes (the same value Django reads)
# Optional:
#   SIGHTLINE_NGINX_PROXY_BIND       local address nginx connects to the replicas from; the web
#                                    replicas trust forwarded headers from this address only
#                                    (uvicorn --forwarded-allow-ips)
#   SIGHTLINE_NGINX_HTTP_LISTEN      addr:port for plain HTTP, which only redirects to HTTPS (301 for
#                                    GET and HEAD, 308 for the rest); unset: no plain HTTP at all
#   SIGHTLINE_NGINX_UPSTREAM_TIMEOUT read/send timeout towards a replica (default 60s); past it,
#                                    an API client gets a 504 in the platform's error shape
#   SIGHTLINE_NGINX_WS_TIMEOUT       idle timeout of a WebSocket (default 3600s)
#   SIGHTLINE_NGINX_WORKERS          worker processes (default auto)
#   SIGHTLINE_NGINX_USER             user the workers run as when nginx starts as root (default:
#                                    nginx's own, nobody); it must be able to read STATIC_ROOT
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: render.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)

fail() {
    echo "render.sh: $*" >&2
    exit 2
}

: "${SIGHTLINE_NGINX_LISTEN:?render.sh: set SIGHTLINE_NGINX_LISTEN (addr:port)}"
: "${SIGHTLINE_NGINX_UPSTREAMS:?render.sh: set SIGHTLINE_NGINX_UPSTREAMS (host:port ...)}"
: "${SIGHTLINE_NGINX_CERT:?render.sh: set SIGHTLINE_NGINX_CERT (PEM path)}"
: "${SIGHTLINE_NGINX_KEY:?render.sh: set SIGHTLINE_NGINX_KEY (PEM path)}"
: "${SIGHTLINE_STATIC_ROOT:?render.sh: set SIGHTLINE_STATIC_ROOT (collectstatic output)}"
: "${SIGHTLINE_MAX_REQUEST_BYTES:?render.sh: set SIGHTLINE_MAX_REQUEST_BYTES (bytes)}"
SIGHTLINE_NGINX_PROXY_BIND=${SIGHTLINE_NGINX_PROXY_BIND:-}
SIGHTLINE_NGINX_HTTP_LISTEN=${SIGHTLINE_NGINX_HTTP_LISTEN:-}
SIGHTLINE_NGINX_UPSTREAM_TIMEOUT=${SIGHTLINE_NGINX_UPSTREAM_TIMEOUT:-60s}
SIGHTLINE_NGINX_WS_TIMEOUT=${SIGHTLINE_NGINX_WS_TIMEOUT:-3600s}
SIGHTLINE_NGINX_WORKERS=${SIGHTLINE_NGINX_WORKERS:-auto}
SIGHTLINE_NGINX_USER=${SIGHTLINE_NGINX_USER:-}

# Values become nginx syntax: refuse anything that could end a directive or open a block.
for name in SIGHTLINE_NGINX_LISTEN SIGHTLINE_NGINX_UPSTREAMS SIGHTLINE_NGINX_CERT SIGHTLINE_NGINX_KEY \
    SIGHTLINE_STATIC_ROOT SIGHTLINE_MAX_REQUEST_BYTES SIGHTLINE_NGINX_PROXY_BIND SIGHTLINE_NGINX_HTTP_LISTEN \
    SIGHTLINE_NGINX_UPSTREAM_TIMEOUT SIGHTLINE_NGINX_WS_TIMEOUT SIGHTLINE_NGINX_WORKERS SIGHTLINE_NGINX_USER; do
    eval "value=\${$name}"
    case $value in
        *[\;\{\}\$\"\'\#\\]* | *"
"*) fail "$name holds a character nginx would read as syntax: $value" ;;
    esac
done
case $SIGHTLINE_MAX_REQUEST_BYTES in
    '' | *[!0-9]*) fail "SIGHTLINE_MAX_REQUEST_BYTES must be a number of bytes" ;;
esac
for path in "$SIGHTLINE_NGINX_CERT" "$SIGHTLINE_NGINX_KEY"; do
    [ -r "$path" ] || fail "cannot read $path"
done
[ -d "$SIGHTLINE_STATIC_ROOT" ] || fail "SIGHTLINE_STATIC_ROOT $SIGHTLINE_STATIC_ROOT is not a directory"
SIGHTLINE_STATIC_ROOT=${SIGHTLINE_STATIC_ROOT%/}

mkdir -p "$out/logs" "$out/errors" \
    "$out/temp/client_body" "$out/temp/proxy" "$out/temp/fastcgi" "$out/temp/uwsgi" "$out/temp/scgi"

export SIGHTLINE_NGINX_LISTEN SIGHTLINE_NGINX_CERT SIGHTLINE_NGINX_KEY SIGHTLINE_STATIC_ROOT \
    SIGHTLINE_MAX_REQUEST_BYTES SIGHTLINE_NGINX_UPSTREAM_TIMEOUT SIGHTLINE_NGINX_WS_TIMEOUT
envsubst '${SIGHTLINE_NGINX_LISTEN} ${SIGHTLINE_NGINX_CERT} ${SIGHTLINE_NGINX_KEY} ${SIGHTLINE_STATIC_ROOT} ${SIGHTLINE_MAX_REQUEST_BYTES} ${SIGHTLINE_NGINX_UPSTREAM_TIMEOUT} ${SIGHTLINE_NGINX_WS_TIMEOUT}' \
    <"$here/sightline.conf.template" >"$out/nginx.conf.new"
mv "$out/nginx.conf.new" "$out/nginx.conf"

: >"$out/upstreams.conf.new"
for upstream in $SIGHTLINE_NGINX_UPSTREAMS; do
    # max_fails 1 / fail_timeout 5s: a replica that refused a connection is skipped for 5 s
    echo "server $upstream max_fails=1 fail_timeout=5s;" >>"$out/upstreams.conf.new"
done
mv "$out/upstreams.conf.new" "$out/upstreams.conf"

if [ -n "$SIGHTLINE_NGINX_PROXY_BIND" ]; then
    echo "proxy_bind $SIGHTLINE_NGINX_PROXY_BIND;" >"$out/proxy_bind.conf"
else
    : >"$out/proxy_bind.conf"
fi

if [ -n "$SIGHTLINE_NGINX_HTTP_LISTEN" ]; then
    # the HTTPS port, for the Location: the listen address's last ":"-separated part
    https_port=${SIGHTLINE_NGINX_LISTEN##*:}
    cat >"$out/http_redirect.conf" <<EOF
server {
    listen $SIGHTLINE_NGINX_HTTP_LISTEN;
    server_name _;
    # nothing is proxied over plain HTTP; the path and query go along (the access log drops the query)
    location / {
        if (\$request_method ~ ^(GET|HEAD)\$) {
            return 301 https://\$host:$https_port\$request_uri;
        }
        return 308 https://\$host:$https_port\$request_uri;
    }
}
EOF
else
    : >"$out/http_redirect.conf"
fi

{
    echo "worker_processes $SIGHTLINE_NGINX_WORKERS;"
    if [ -n "$SIGHTLINE_NGINX_USER" ] && [ "$(id -u)" = 0 ]; then
        echo "user $SIGHTLINE_NGINX_USER $(id -gn "$SIGHTLINE_NGINX_USER");"
    fi
} >"$out/main.conf"

if [ -r /etc/nginx/mime.types ]; then
    cp /etc/nginx/mime.types "$out/mime.types"
else
    printf 'types {\n    text/html html;\n    text/css css;\n    application/javascript js mjs;\n    application/json json;\n    application/wasm wasm;\n    image/png png;\n    image/svg+xml svg;\n}\n' >"$out/mime.types"
fi

# nginx's own answers: {"error": {"code", "message", "detail"}} for machine clients, a page otherwise.
error_file() { # status code retry message
    retry=$3
    printf '{"error": {"code": "%s", "message": "%s", "detail": {"status": %s, "retry": %s}}}\n' \
        "$2" "$4" "$1" "$retry" >"$out/errors/$1.json"
    cat >"$out/errors/$1.html" <<EOF
<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Sightline</title></head>
<body>
<h1>Sightline</h1>
<p>$4</p>
</body>
</html>
EOF
}
error_file 400 bad_request false "The request could not be read."
error_file 404 not_found false "Not found."
error_file 408 timeout true "The request took too long to arrive; retry."
error_file 413 too_large false "The request is larger than $((SIGHTLINE_MAX_REQUEST_BYTES / 1048576)) MB."
error_file 414 uri_too_long false "The address is too long."
error_file 494 headers_too_large false "The request headers are too large."
error_file 500 server_error true "Something went wrong on the server; retry in a few seconds."
error_file 502 bad_gateway true "The service is briefly unavailable; retry in a few seconds."
error_file 503 unavailable true "The service is briefly unavailable; retry in a few seconds."
error_file 504 gateway_timeout true "The service took too long to answer; retry in a few seconds."

# Started as root, nginx's workers drop to SIGHTLINE_NGINX_USER (else nginx's default, nobody):
# that user must reach the error pages and the static files, or every one of them is a 403.
if [ "$(id -u)" = 0 ] && command -v runuser >/dev/null 2>&1; then
    worker=${SIGHTLINE_NGINX_USER:-nobody}
    runuser -u "$worker" -- test -r "$out/errors/502.json" -a -x "$SIGHTLINE_STATIC_ROOT" ||
        fail "nginx's workers run as $worker, who cannot read $out/errors or $SIGHTLINE_STATIC_ROOT: set SIGHTLINE_NGINX_USER or make them readable"
fi

nginx -t -q -p "$out" -c "$out/nginx.conf" -e "$out/logs/error.log" || fail "nginx -t refused $out/nginx.conf"
echo "$out/nginx.conf"
