# Shared set-up steps for scripts/test and scripts/demo (sourced, not run).

TOOLS="${CONNDIAG_TOOLS_VENV:-$PWD/.venvs/tools}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_install() {
  [ "$#" -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "missing system packages: $* (install them, then run again)"; return 1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { python3 -c "import socket,sys; socket.create_connection(('$1', $2), 1)" 2>/dev/null; }

ensure_mariadb() {
  port_open 127.0.0.1 3306 && return 0
  local server; server=$(command -v mariadbd || command -v mysqld || true)
  if [ -n "$server" ] && command -v start-stop-daemon >/dev/null; then
    log "starting MariaDB ($server)"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec "$server"
    for _ in $(seq 60); do port_open 127.0.0.1 3306 && return 0; sleep 0.5; done
  fi
  log "no MariaDB on 127.0.0.1:3306; the tests will try a private server"
}

tools_venv() {
  if [ ! -x "$TOOLS/bin/nox" ] || [ ! -x "$TOOLS/bin/uv" ]; then
    log "creating the tools venv in $TOOLS"
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q --upgrade pip
    "$TOOLS/bin/python" -m pip install -q "nox>=2025.2.9" "uv>=0.8"
  fi
  export PATH="$TOOLS/bin:$PATH"
}

add_pyenv_pythons() {
  # nox looks interpreters up as pythonX.Y on PATH: put every pyenv 3.x install there.
  local root; root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for bin in "$root"/versions/3.*/bin; do
    [ -d "$bin" ] && PATH="$PATH:$bin"
  done
  export PATH
}

ensure_postgres() {
  port_open 127.0.0.1 5432 && return 0
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    log "starting PostgreSQL"
    for version in /etc/postgresql/*; do
      pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
    done
    for _ in $(seq 60); do port_open 127.0.0.1 5432 && return 0; sleep 0.5; done
  fi
  log "no PostgreSQL on 127.0.0.1:5432; PostgreSQL tests fail under CI=true"
}
