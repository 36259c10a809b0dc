#!/usr/bin/env bash
# Entrypoint of the camex_ds images (docker/Dockerfile, docker/Dockerfile.cpu).
#
#   IMAGE [PRETRAIN_ARGS...]
#       deepspeed $DS_LAUNCHER_ARGS launcher/pretrain.py PRETRAIN_ARGS...
#   IMAGE [DEEPSPEED_ARGS...] -- [PRETRAIN_ARGS...]
#       deepspeed DEEPSPEED_ARGS... launcher/pretrain.py PRETRAIN_ARGS...
#       (launcher flags such as --hostfile, --num_gpus, --no_ssh, --node_rank,
#       --master_addr go before the "--"). With --hostfile and without
#       --no_ssh, sshd starts in the background first: pdsh reaches every host
#       of the hostfile over ssh, this one included
#   IMAGE sshd
#       OpenSSH server in the foreground on $SSH_PORT (default 2222), run as
#       the image's non-root user: the worker side of DeepSpeed's pdsh launcher
#   IMAGE COMMAND [ARGS...]
#       any other command (bash, python tools/..., ds_report) is run as given
#
# With no arguments it prints this help and pretrain.py's --help.
#
# SSH keys: if $SSH_KEY_DIR (default /run/secrets/camex_ssh) holds id_* key
# files and/or an authorized_keys file, they are installed into ~/.ssh in
# every mode, so the launching node can reach the workers and vice versa.
set -euo pipefail

CAMEX_HOME="${CAMEX_HOME:-/opt/camex_ds}"
PRETRAIN="${CAMEX_HOME}/launcher/pretrain.py"
SSH_KEY_DIR="${SSH_KEY_DIR:-/run/secrets/camex_ssh}"
SSH_PORT="${SSH_PORT:-2222}"

usage() {
    sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
}

install_ssh_keys() {
    [[ -d "${SSH_KEY_DIR}" ]] || return 0
    local ssh_dir="${HOME}/.ssh" f
    mkdir -p "${ssh_dir}"
    chmod 700 "${ssh_dir}"
    for f in "${SSH_KEY_DIR}"/id_*; do
        [[ -f "${f}" ]] || continue
        install -m 600 "${f}" "${ssh_dir}/$(basename "${f}")"
    done
    if [[ -f "${SSH_KEY_DIR}/authorized_keys" ]]; then
        install -m 600 "${SSH_KEY_DIR}/authorized_keys" "${ssh_dir}/authorized_keys"
    elif compgen -G "${SSH_KEY_DIR}/id_*.pub" >/dev/null; then
        cat "${SSH_KEY_DIR}"/id_*.pub >"${ssh_dir}/authorized_keys"
        chmod 600 "${ssh_dir}/authorized_keys"
    fi
}

# run_sshd [--background]: in the foreground (exec) unless --background.
run_sshd() {
    local sshd_bin=/usr/sbin/sshd ssh_dir="${HOME}/.ssh" problem=""
    if [[ ! -x "${sshd_bin}" ]]; then
        problem="${sshd_bin} not found; the sshd mode needs OpenSSH (docker/install.sh system)"
    elif [[ ! -s "${ssh_dir}/authorized_keys" ]]; then
        problem="no ${ssh_dir}/authorized_keys; mount a key directory at ${SSH_KEY_DIR}"
    fi
    if [[ -n "${problem}" ]]; then
        echo "entrypoint: ${problem}" >&2
        # a launch goes on without it: pdsh's ssh to this host then fails, and says why
        [[ "${1:-}" == --background ]] && return 0
        exit 1
    fi
    mkdir -p "${ssh_dir}/sshd"
    if [[ ! -f "${ssh_dir}/sshd/ssh_host_ed25519_key" ]]; then
        ssh-keygen -q -t ed25519 -N '' -f "${ssh_dir}/sshd/ssh_host_ed25519_key"
    fi
    # pdsh runs a non-interactive shell that would not see the image's ENV
    # (PATH, CUDA/NCCL settings...): hand it this environment instead.
    env | grep -E '^[A-Za-z_][A-Za-z0-9_]*=' \
        | grep -v -E '^(HOME|HOSTNAME|PWD|OLDPWD|SHLVL|_|TERM|SSH_[A-Z_]*)=' \
        >"${ssh_dir}/environment" || true
    chmod 600 "${ssh_dir}/environment"
    # Unprivileged sshd: only this user can log in, with keys only.
    local options=(-p "${SSH_PORT}"
        -h "${ssh_dir}/sshd/ssh_host_ed25519_key"
        -o PidFile="${ssh_dir}/sshd/sshd.pid"
        -o UsePAM=no
        -o PasswordAuthentication=no
        -o KbdInteractiveAuthentication=no
        -o PermitUserEnvironment=yes
        -o AuthorizedKeysFile="${ssh_dir}/authorized_keys")
    echo "entrypoint: sshd listening on port ${SSH_PORT} as $(id -un)"
    if [[ "${1:-}" == --background ]]; then
        "${sshd_bin}" -E "${ssh_dir}/sshd/sshd.log" "${options[@]}"  # detaches; ends with the container
    else
        exec "${sshd_bin}" -D -e "${options[@]}"
    fi
}

install_ssh_keys

if [[ $# -eq 0 ]]; then
    usage
    echo
    exec python "${PRETRAIN}" --help
fi

case "$1" in
    sshd)
        run_sshd
        ;;
    -*)
        # Training: split "[deepspeed args] -- [pretrain args]".
        launcher_args=()
        if [[ -n "${DS_LAUNCHER_ARGS:-}" ]]; then
            read -r -a launcher_args <<<"${DS_LAUNCHER_ARGS}"
        fi
        pretrain_args=("$@")
        for ((i = 1; i <= $#; i++)); do
            if [[ "${!i}" == "--" ]]; then
                launcher_args+=("${@:1:i-1}")
                pretrain_args=("${@:i+1}")
                break
            fi
        done
        if [[ " ${launcher_args[*]} " == *" --hostfile"* && " ${launcher_args[*]} " != *" --no_ssh "* ]]; then
            run_sshd --background
        fi
        exec deepspeed "${launcher_args[@]}" "${PRETRAIN}" "${pretrain_args[@]}"
        ;;
    *)
        exec "$@"
        ;;
esac
