#!/bin/sh
# Create the prodcat topics listed in topics.conf, idempotently (--if-not-exists).
# Runs inside an Apache Kafka image (apache/kafka: /opt/kafka/bin/kafka-topics.sh).
#
# Env:
#   BOOTSTRAP_SERVERS    broker list (required)
#   REPLICATION_FACTOR   1 for the single-node compose stack, 3 on a real cluster (default 3)
#   TOPICS_FILE          default: topics.conf next to this script
#   PRODCAT_KAFKA__*     the same librdkafka passthrough settings the workers get (security.protocol,
#                        sasl.mechanism, sasl.username, sasl.password, ssl.ca.location); translated
#                        here into the Java client's properties so one Secret serves both.
set -eu

: "${BOOTSTRAP_SERVERS:?set BOOTSTRAP_SERVERS}"
RF="${REPLICATION_FACTOR:-3}"
TOPICS_FILE="${TOPICS_FILE:-$(dirname "$0")/topics.conf}"
KAFKA_BIN="${KAFKA_BIN:-/opt/kafka/bin}"
PROPS="$(mktemp)"
trap 'rm -f "$PROPS"' EXIT

# --- librdkafka passthrough -> Java client properties
protocol="${PRODCAT_KAFKA__SECURITY_PROTOCOL:-PLAINTEXT}"
mechanism="${PRODCAT_KAFKA__SASL_MECHANISM:-${PRODCAT_KAFKA__SASL_MECHANISMS:-PLAIN}}"
echo "security.protocol=$protocol" >>"$PROPS"
case "$protocol" in
  SASL_*)
    case "$mechanism" in
      PLAIN) module=org.apache.kafka.common.security.plain.PlainLoginModule ;;
      SCRAM-SHA-256|SCRAM-SHA-512) module=org.apache.kafka.common.security.scram.ScramLoginModule ;;
      *) echo "create-topics: sasl mechanism $mechanism not supported here; create topics by hand" >&2; exit 2 ;;
    esac
    echo "sasl.mechanism=$mechanism" >>"$PROPS"
    echo "sasl.jaas.config=$module required username=\"${PRODCAT_KAFKA__SASL_USERNAME:?}\" password=\"${PRODCAT_KAFKA__SASL_PASSWORD:?}\";" >>"$PROPS"
    ;;
esac
if [ -n "${PRODCAT_KAFKA__SSL_CA_LOCATION:-}" ]; then
  printf 'ssl.truststore.type=PEM\nssl.truststore.location=%s\n' "$PRODCAT_KAFKA__SSL_CA_LOCATION" >>"$PROPS"
fi

# --- wait for the broker (compose starts us as soon as the container is healthy; k8s may be earlier)
i=0
until "$KAFKA_BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP_SERVERS" --command-config "$PROPS" --list >/dev/null 2>&1; do
  i=$((i + 1))
  [ "$i" -ge 60 ] && { echo "create-topics: broker $BOOTSTRAP_SERVERS not reachable" >&2; exit 1; }
  sleep 2
done

# --- create
grep -v '^[[:space:]]*#' "$TOPICS_FILE" | while read -r topic partitions configs; do
  [ -n "$topic" ] || continue
  extra=""
  if [ -n "${configs:-}" ]; then
    for c in $(echo "$configs" | tr ',' ' '); do extra="$extra --config $c"; done
  fi
  # with 3 replicas, acks=all survives one broker down without losing acknowledged writes
  [ "$RF" -ge 3 ] && extra="$extra --config min.insync.replicas=2"
  # shellcheck disable=SC2086  # $extra is a list of flags
  "$KAFKA_BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP_SERVERS" --command-config "$PROPS" \
    --create --if-not-exists --topic "$topic" --partitions "$partitions" --replication-factor "$RF" $extra
  # --if-not-exists leaves an existing topic alone: warn when its partition count differs
  have=$("$KAFKA_BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP_SERVERS" --command-config "$PROPS" \
    --describe --topic "$topic" | grep -c 'Partition: ' || true)
  [ "$have" = "$partitions" ] || echo "create-topics: WARNING $topic has $have partitions, topics.conf says $partitions" >&2
done
echo "create-topics: done"
