#!/usr/bin/env bash
# Make sure a RabbitMQ answers at QFLARE_AMQP_URL (default 127.0.0.1:5672); start the local
# one if it is installed and stopped; otherwise say how to get one.
set -euo pipefail
url="${QFLARE_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$host" ] && port=5672
answers() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }
management() {
  # per-device broker users are managed over the HTTP API: enable it on a local broker
  [ "$host" = "127.0.0.1" ] || [ "$host" = "localhost" ] || return 0
  command -v rabbitmq-plugins >/dev/null 2>&1 || return 0
  (exec 3<>"/dev/tcp/$host/15672") 2>/dev/null && return 0
  echo "enabling the RabbitMQ management plugin (HTTP API on 15672)..."
  rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    (exec 3<>"/dev/tcp/$host/15672") 2>/dev/null && return 0
    sleep 1
  done
  echo "warning: the management API did not come up on $host:15672" >&2
}
if answers; then echo "RabbitMQ answers at $host:$port"; management; exit 0; fi
if [ "$host" = "127.0.0.1" ] || [ "$host" = "localhost" ]; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "RabbitMQ is not running; starting it (rabbitmq-server -detached)..."
    rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 1 90); do
      if answers && { ! command -v rabbitmqctl >/dev/null || rabbitmqctl -q status >/dev/null 2>&1; }; then
        echo "RabbitMQ answers at $host:$port"; management; exit 0
      fi
      sleep 1
    done
  fi
fi
cat >&2 <<MSG
No RabbitMQ answers at $host:$port.
Start one: 'rabbitmq-server -detached' (Debian: apt-get install rabbitmq-server),
or 'docker compose up -d rabbitmq' with this repository's compose.yaml,
or point QFLARE_AMQP_URL at a broker you have.
MSG
exit 1
