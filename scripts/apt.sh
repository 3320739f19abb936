# Sourced by the setup scripts: apt_install PKG... installs the Debian packages given (with sudo
# when not root), after one `apt-get update`; nothing when none is given.
apt_install() {
    [ $# -gt 0 ] || return 0
    echo "setup: installing $*" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}
