#!/usr/bin/env bash
# Sets up dicomnode in .venv at the repository root.
#   scripts/setup.sh           the node and its serving dependencies, plus the DICOM tools it
#                              uses at run time (dcmtk, dicom3tools) and Orthanc for the demo
#   scripts/setup.sh --test    also the test and lint tools, the training extra (torch), and
#                              the scale-out extra with the servers its tests start
#                              (PostgreSQL, Redis, RabbitMQ: Debian's, never started as
#                              services)
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test,train,scale]" ;;
    --gpu) extras="[gpu]" ;;
    *) echo "usage: scripts/setup.sh [--test|--gpu]" >&2; exit 2 ;;
  esac
done

need_apt=()
command -v storescu >/dev/null 2>&1 || need_apt+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
if [ "$extras" = "[test,train,scale]" ]; then
  command -v strace >/dev/null 2>&1 || need_apt+=(strace)  # the write-order test
  command -v curl >/dev/null 2>&1 || need_apt+=(curl)  # the HTTPS client in test_web_tls
  # the browser tests: headless Chromium, and Orthanc's web viewer plugin
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  [ -e /usr/share/orthanc/plugins/libOrthancWebViewer.so ] || need_apt+=(orthanc-webviewer)
  # the scale-out tests start their own PostgreSQL and Redis on loopback ports
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
  # and RabbitMQ, the other Celery broker (Erlang; about 57 MB installed)
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_apt+=(rabbitmq-server)
  # the audit forwarding tests start their own rsyslog (with its GnuTLS driver) as the
  # Audit Record Repository; an rsyslog already logging for the machine is left alone
  command -v rsyslogd >/dev/null 2>&1 || need_apt+=(rsyslog)
  compgen -G "/usr/lib/*/rsyslog/lmnsd_gtls.so" >/dev/null || need_apt+=(rsyslog-gnutls)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian starts an Orthanc service on install; the tests and demo start their own.
    (service orthanc stop || systemctl stop orthanc || true) >/dev/null 2>&1
    # likewise PostgreSQL's, Redis's and RabbitMQ's own services
    for svc in postgresql redis-server rabbitmq-server; do
      (service "$svc" stop || systemctl stop "$svc" || true) >/dev/null 2>&1
    done
  else
    echo "setup: missing ${need_apt[*]} (Debian packages); install them as root" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if [ "$extras" = "[gpu]" ]; then
  # onnxruntime-gpu provides the same module; the CPU wheel would shadow it.
  .venv/bin/python -m pip uninstall -y -q onnxruntime >/dev/null 2>&1 || true
fi
.venv/bin/python -m pip install -q -e ".${extras}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/dicomnode --help >/dev/null
echo "setup: ready (.venv/bin/dicomnode)"
