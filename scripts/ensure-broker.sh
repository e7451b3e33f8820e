#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672: starts one with
# `rabbitmq-server -detached` when it is installed and not running, and waits
# for it. Exits non-zero, saying how to get one, when there is none.
set -euo pipefail
host=127.0.0.1 port=5672 wait_s=${FASTFIB_BROKER_WAIT:-90}

answers() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

if answers; then exit 0; fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "No RabbitMQ broker answers on $host:$port and rabbitmq-server is not installed." >&2
  echo "Install one (Debian/Ubuntu: apt-get install rabbitmq-server) or run one in a container:" >&2
  echo "  docker run -d -p 5672:5672 rabbitmq:3" >&2
  exit 1
fi
echo "Starting RabbitMQ (rabbitmq-server -detached)..." >&2
rabbitmq-server -detached || true
for _ in $(seq "$wait_s"); do
  if answers && rabbitmqctl -q await_startup >/dev/null 2>&1; then
    echo "RabbitMQ is up on $host:$port." >&2
    exit 0
  fi
  sleep 1
done
echo "RabbitMQ did not answer on $host:$port within ${wait_s}s; see /var/log/rabbitmq/." >&2
exit 1
