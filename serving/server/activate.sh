
# digitserve: a plain `torchserve --start` in this venv serves this checkout's config.properties.
# TorchServe 0.12 reads a config only through --ts-config or TS_CONFIG_FILE; an exported
# TS_CONFIG_FILE would also override every explicit --ts-config (the production config
# included), so this adds the flag only when the command names no config itself.
torchserve() {
    case " $* " in
        *" --start "*)
            case " $* " in
                *" --ts-config "*|*" --ts-config="*) ;;
                *) [ -z "${TS_CONFIG_FILE:-}" ] && set -- "$@" --ts-config "@CONFIG@" ;;
            esac ;;
    esac
    command torchserve "$@"
}
