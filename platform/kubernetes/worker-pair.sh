#!/bin/sh
# One GPU, two lanes (README, Two lanes): the interactive worker and the bulk worker of one GPU
# pod (the container's SIGHTLINE_GPU_BUSY_PERCENT is the bulk lane's; the interactive lane never
# pauses: 100). The pod ends when either ends, so Kubernetes restarts both; SIGTERM stops both gracefully.
set -u
SIGHTLINE_WORKER_LANE=interactive SIGHTLINE_GPU_BUSY_PERCENT=100 \
    celery -A workers.celery worker -P prefork -c "${WORKER_CONCURRENCY:-1}" -Q interactive,bulk \
    -n "interactive@${HOSTNAME}" -l info --without-gossip &
interactive=$!
SIGHTLINE_WORKER_LANE=bulk \
    nice -n 10 celery -A workers.celery worker -P prefork -c "${WORKER_CONCURRENCY:-1}" -Q maintenance,bulk \
    -n "bulk@${HOSTNAME}" -l info --without-gossip &
bulk=$!
trap 'kill -TERM "$interactive" "$bulk" 2>/dev/null' TERM INT
# POSIX sh has no `wait -n`: poll until one of the two is gone
while kill -0 "$interactive" 2>/dev/null && kill -0 "$bulk" 2>/dev/null; do
    sleep 2
done
kill -TERM "$interactive" "$bulk" 2>/dev/null
wait
exit 1
