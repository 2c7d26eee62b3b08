"""The `loupe` command. Every subcommand turns a LoupeError into one line and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

from loupe import interrupt
from loupe.cli.args import (
    SEED_MAX,
    Parser,
    check_out,
    device_arg,
    float_range,
    int_range,
    path_arg,
)
from loupe.errors import LoupeError

#: upper bounds of sizes that allocate memory (environments, steps per update, Ray workers)
MAX_ENVS = 65_536
MAX_STEPS = 1 << 20
MAX_WORKERS = 4096


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict with ints, floats and booleans parsed."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LoupeError(f"{flag} expects KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = _parse_value(value)
    return options


def default_preset(env_id: str, policy: str) -> str:
    if env_id.startswith("procgen:"):
        return "procgen"
    return "atari-sun" if policy.startswith("sun-") else "atari-nikulin"


# -- train -------------------------------------------------------------------------------------
def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", help="environment id: ALE/<Game>-v5 or procgen:<game> (required)")
    p.add_argument("--policy", default=None,
                   help="policy name, see `loupe policies` (default: impala on procgen, nature on "
                   "Atari)")  # fmt: skip
    p.add_argument("--preset", default=None,
                   help="PPO preset: procgen, atari-nikulin, atari-sun (default: procgen on "
                   "procgen, atari-sun for sun-* policies, else atari-nikulin)")  # fmt: skip
    p.add_argument("--attn-coef", type=float_range(0.0, 100.0), default=None,
                   help="attention entropy coefficient (default: the preset's)")  # fmt: skip
    p.add_argument("--total-steps", type=int_range(1), default=None,
                   help="environment steps in all (required)")  # fmt: skip
    p.add_argument("--run-dir", type=path_arg, default=None,
                   help="new or empty directory for checkpoints, logs and config (required)")  # fmt: skip
    p.add_argument("--resume", type=path_arg, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest checkpoint (default: a new "
                   "run)")  # fmt: skip
    p.add_argument("--num-envs", type=int_range(1, MAX_ENVS), default=None,
                   help="environments in all, all actors together (default: the preset's)")  # fmt: skip
    p.add_argument("--num-steps", type=int_range(1, MAX_STEPS), default=None,
                   help="steps per env per update (default: the preset's)")  # fmt: skip
    p.add_argument("--minibatches", type=int_range(1, MAX_STEPS), default=None,
                   help="minibatches per epoch (default: the preset's)")  # fmt: skip
    p.add_argument("--epochs", type=int_range(1, 10_000), default=None,
                   help="epochs per update (default: the preset's)")  # fmt: skip
    p.add_argument("--lr", type=float_range(0.0, 1.0, lo_open=True), default=None,
                   help="learning rate (default: the preset's)")  # fmt: skip
    p.add_argument("--seed", type=int_range(0, SEED_MAX), default=None,
                   help="seed of environments, weights and sampling (default: the preset's)")  # fmt: skip
    p.add_argument("--env-option", action="append", metavar="K=V",
                   help="environment option, repeatable, e.g. num_levels=200 (default: the env's)")  # fmt: skip
    p.add_argument("--policy-option", action="append", metavar="K=V",
                   help="policy option, repeatable, e.g. attention=sigmoid (default: the "
                   "policy's)")  # fmt: skip
    p.add_argument("--checkpoint-every", type=int_range(1), default=None,
                   help="updates per checkpoint (default: 10)")  # fmt: skip
    p.add_argument("--keep-last", type=int_range(0, 1_000_000), default=None,
                   help="checkpoints kept with their training state, the newest; 0 keeps every "
                   "checkpoint (default: 5)")  # fmt: skip
    p.add_argument("--keep-every", type=int_range(0, 1_000_000), default=None,
                   help="also keep the weights of every N-th checkpoint written; 0: none "
                   "(default: 0)")  # fmt: skip
    p.add_argument("--tb-max-points", type=int_range(0, 1_000_000_000), default=None,
                   help="TensorBoard points per tag over the run at most; 0: one per update "
                   "(default: 100000)")  # fmt: skip
    p.add_argument("--actors", type=int_range(0, MAX_WORKERS), default=None,
                   help="Ray rollout actors; 0 samples in-process (default: 0)")  # fmt: skip
    p.add_argument("--envs-per-actor", type=int_range(1, MAX_ENVS), default=None,
                   help="environments per actor, sets --num-envs to this times --actors "
                   "(default: --num-envs split over the actors)")  # fmt: skip
    p.add_argument("--inference", choices=["actor", "central"], default=None,
                   help="where the policy runs with --actors: on each actor, or batched on the "
                   "learner (default: actor)")  # fmt: skip
    p.add_argument("--max-policy-lag", type=int_range(0, 1000), default=None,
                   help="policy versions an actor may lag behind the learner (default: 1)")  # fmt: skip
    p.add_argument("--proximal", choices=["auto", "behaviour", "learner"], default=None,
                   help="PPO ratio against the behaviour policy, the learner (decoupled PPO), or auto: "
                   "the learner when the batch is stale (default: auto)")  # fmt: skip
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="arithmetic of the PPO update: auto, fp32, or bf16 autocast; with --resume "
                   "it replaces the run's setting (default: auto, bf16 where it pays and the CPU "
                   "has native bf16, else fp32)")  # fmt: skip
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default=None,
                   help="the PPO update's convolutions in channels-last memory format; with "
                   "--resume it replaces the run's setting (default: auto, on where it pays on a "
                   "CPU)")  # fmt: skip
    p.add_argument("--compile", choices=["on", "off"], default=None,
                   help="torch.compile the policy for the PPO update (a compile of a minute or "
                   "more at each start); with --resume it replaces the run's setting "
                   "(default: off)")  # fmt: skip
    p.add_argument("--learners", type=int_range(1, 1024), default=None,
                   help="data-parallel learner processes: NCCL with one GPU each, gloo with one CPU "
                   "each (default: 1)")  # fmt: skip
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address HOST:PORT or auto (default: a private local Ray)")  # fmt: skip
    p.add_argument("--redis", default=None,
                   help="redis://... URL for checkpoint announcements (default: a private "
                   "redis-server in RUN_DIR/redis)")  # fmt: skip
    p.add_argument("--no-announce", action="store_true",
                   help="do not announce checkpoints on Redis (default: announce)")  # fmt: skip
    p.add_argument("--device", type=device_arg, default=None,
                   help="learner device: auto, cpu, cuda or cuda:N (default: auto, cuda when there "
                   "is one)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar on a terminal)")  # fmt: skip
    p.add_argument("--supervise", action="store_true",
                   help="train in a child process and restart it from its newest checkpoint when "
                   "it dies (a signal, or an exit other than 0, 2, 130 or 143), one line per "
                   "restart (default: no restarts)")  # fmt: skip
    p.add_argument("--max-restarts", type=int_range(0, 1000), default=None,
                   help="with --supervise: restarts in a row without a new checkpoint before the "
                   "run ends with an error (default: 5)")  # fmt: skip


#: --channels-last / --compile values -> PPOConfig values
_SWITCH = {"auto": None, "on": True, "off": False}


def speed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The PPO settings that change the update's speed, not its results, given on the command
    line: precision, channels_last, compile (the ones a resumed run may change)."""
    out: dict[str, Any] = {}
    if getattr(args, "precision", None) is not None:
        out["precision"] = args.precision
    if getattr(args, "channels_last", None) is not None:
        out["channels_last"] = _SWITCH[args.channels_last]
    if getattr(args, "compile", None) is not None:
        out["compile"] = _SWITCH[args.compile]
    return out


def _show(value: Any) -> str:
    """A speed setting as the command line spells it."""
    return value if isinstance(value, str) else {None: "auto", True: "on", False: "off"}[value]


def build_train_config(args: argparse.Namespace):
    from actors import EnvConfig
    from learner import PPOConfig
    from loupe.train import TrainConfig

    if not args.env:
        raise LoupeError("--env is required (e.g. procgen:coinrun or ALE/Breakout-v5)")
    if not args.run_dir:
        raise LoupeError("--run-dir is required (a new or empty directory)")
    if args.total_steps is None:
        raise LoupeError("--total-steps is required")
    if args.total_steps <= 0:
        raise LoupeError(f"--total-steps must be positive, got {args.total_steps}")
    for flag in ("num_envs", "num_steps", "minibatches", "epochs", "actors", "envs_per_actor"):
        value = getattr(args, flag)
        if value is not None and value <= 0 and not (flag == "actors" and value == 0):
            raise LoupeError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    policy = args.policy or ("impala" if args.env.startswith("procgen:") else "nature")
    preset = args.preset or default_preset(args.env, policy)
    overrides: dict[str, Any] = {"total_steps": args.total_steps}
    actors = args.actors or 0
    num_envs = args.num_envs
    if args.envs_per_actor is not None:
        if not actors:
            raise LoupeError("--envs-per-actor needs --actors N")
        num_envs = args.envs_per_actor * actors
    for flag, key in (
        ("num_steps", "num_steps"),
        ("minibatches", "num_minibatches"),
        ("epochs", "update_epochs"),
        ("lr", "lr"),
        ("seed", "seed"),
        ("attn_coef", "attn_coef"),
        ("proximal", "proximal"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if num_envs is not None:
        overrides["num_envs"] = num_envs
    overrides |= speed_settings(args)
    ppo = PPOConfig.preset(preset, **overrides)
    env_options = parse_options(args.env_option, "--env-option")
    valid = {f.name for f in dataclasses.fields(EnvConfig) if f.init} - {
        "env_id",
        "num_envs",
        "seed",
    }
    unknown = sorted(set(env_options) - valid)
    if unknown:
        raise LoupeError(
            f"unknown --env-option {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}"
        )
    env = EnvConfig(env_id=args.env, num_envs=ppo.num_envs, seed=ppo.seed, **env_options)
    extra: dict[str, Any] = {}
    if args.learners is not None and args.learners < 1:
        raise LoupeError(f"--learners must be at least 1, got {args.learners}")
    for key in (
        "checkpoint_every",
        "keep_last",
        "keep_every",
        "tb_max_points",
        "learners",
        "inference",
        "max_policy_lag",
        "ray_address",
        "redis",
        "device",
    ):
        if getattr(args, key) is not None:
            extra[key] = getattr(args, key)
    return TrainConfig(
        env=env,
        ppo=ppo,
        run_dir=str(args.run_dir),
        policy=policy,
        policy_options=parse_options(args.policy_option, "--policy-option"),
        preset=preset,
        actors=actors,
        announce=not args.no_announce,
        **extra,
    )


def cmd_train(args: argparse.Namespace) -> int:
    if getattr(args, "supervise", False):
        return supervise_train(args)
    if getattr(args, "max_restarts", None) is not None:
        raise LoupeError("--max-restarts needs --supervise")
    from loupe.rundir import RunDir
    from loupe.train import TrainConfig, Trainer

    if args.resume:
        run = RunDir(args.resume)
        run.require_run()
        config = TrainConfig.load(run.config_path)
        config.run_dir = str(run.path)  # the directory may have been moved or copied
        if args.total_steps is not None:
            if args.total_steps <= 0:
                raise LoupeError(f"--total-steps must be positive, got {args.total_steps}")
            config.ppo.total_steps = args.total_steps
        if args.learners is not None and args.learners != config.learners:
            if args.learners < 1:
                raise LoupeError(f"--learners must be at least 1, got {args.learners}")
            config = dataclasses.replace(config, learners=args.learners)  # validated again
        speed = {k: v for k, v in speed_settings(args).items() if getattr(config.ppo, k) != v}
        for key, value in speed.items():  # in place: the derived sizes stay as they were
            setattr(config.ppo, key, value)
        config.ppo.check_ranges()
        trainer = Trainer(config, resume=True, progress=not args.no_progress)
        saved = TrainConfig.load(run.config_path)
        for key, value in speed.items():
            print(f"resumed with {key} {_show(value)} (was {_show(getattr(saved.ppo, key))})")
        if config.learners != saved.learners or speed:
            # later resumes keep the new settings; everything else stays as the run saved it
            for key, value in speed.items():
                setattr(saved.ppo, key, value)
            saved.learners = config.learners
            saved.save(run.config_path)
    else:
        config = build_train_config(args)
        check_out(config.run_dir, "--run-dir")
        run = RunDir(config.run_dir)
        run.check_new()
        trainer = Trainer(config, progress=not args.no_progress)  # validates env and policy
        with interrupt.deferred():  # a run directory always holds its config
            run.create()
            config.save(run.config_path)
    interrupt.resume_hint = "loupe " + shlex.join(
        ["train", "--resume", str(run.path)]
        + (["--total-steps", str(args.total_steps)] if args.resume and args.total_steps else [])
    )
    print(
        f"run {config.run_id}: {config.env.env_id}, policy {config.policy}, "
        f"preset {config.preset}, {config.ppo.total_steps} steps -> {run.path}"
    )
    note = trainer.rounding_note()
    if note:
        print(note)
    stats = trainer.train()
    print(f"done at step {trainer.learner.global_step}; checkpoints in {run.checkpoints}")
    if "mean_return_100" in stats:
        print(f"mean return over the last 100 episodes: {stats['mean_return_100']:.3f}")
    else:
        print("mean return: no episode finished yet")
    return 0


def train_argv(args: argparse.Namespace, drop: tuple[str, ...] = ("supervise", "max_restarts")):
    """The `loupe train` options of ``args`` that differ from their defaults, as argv."""
    argv: list[str] = []
    for action in _train_parser()._actions:
        if not action.option_strings or action.dest in drop or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            argv += [f"{flag}={item}" for item in value]
        else:
            argv.append(f"{flag}={value}")
    return argv


def supervise_train(args: argparse.Namespace) -> int:
    """`loupe train --supervise`: the training in a child process, restarted when it dies."""
    # the clean-up after a death talks to the run's redis-server: its client library (~13 MB)
    # is loaded now, so the supervisor's memory does not step up at the first restart
    import redis  # noqa: F401

    from loupe.bus.redis_server import stop_leftover
    from loupe.rundir import RunDir
    from loupe.supervise import SuperviseConfig, Supervisor

    if args.resume:
        RunDir(args.resume).require_run()
    elif not args.run_dir:
        raise LoupeError("--supervise needs --run-dir (a new run) or --resume RUN_DIR")
    run = RunDir(args.resume or args.run_dir)
    config = SuperviseConfig(**({} if args.max_restarts is None else
                                {"max_restarts": args.max_restarts}))  # fmt: skip
    loupe = [sys.executable, "-m", "loupe.cli", *(["-v"] if args.verbose else []), "train"]
    again = ["--resume", str(run.path)]
    for flag in ("total_steps", "learners", "precision", "channels_last", "compile"):
        if getattr(args, flag) is not None:
            again.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}")
    if args.no_progress:
        again.append("--no-progress")
    kept = [f"--max-restarts={args.max_restarts}"] if args.max_restarts is not None else []
    hint = "loupe " + shlex.join(["train", *again, "--supervise", *kept])
    interrupt.resume_hint = hint

    def cleanup() -> None:  # a killed learner leaves its private redis-server running
        try:
            stop_leftover(run.redis)
        except LoupeError as exc:  # the next learner takes it over, or says why it cannot
            logging.getLogger("loupe.supervise").warning("%s", exc)

    supervisor = Supervisor(
        first=loupe + (again if args.resume else train_argv(args)),
        resume=loupe + again,
        run_dir=run.path,
        config=config,
        cleanup=cleanup,
        resume_hint=hint,
    )
    return supervisor.run()


# -- demo --------------------------------------------------------------------------------------
def train_namespace(**values) -> argparse.Namespace:
    """The arguments of `loupe train` with defaults, overridden by ``values`` (for the demo)."""
    ns = argparse.Namespace(
        **{a.dest: a.default for a in _train_parser()._actions if a.dest != "help"}
    )
    for key, value in values.items():
        setattr(ns, key, value)
    return ns


def _train_parser() -> argparse.ArgumentParser:
    p = Parser(add_help=False)
    add_train_args(p)
    return p


def _demo(args: argparse.Namespace) -> int:
    from loupe.cli.demo import cmd_demo

    return cmd_demo(args)


# -- misc ----------------------------------------------------------------------------------------
def cmd_policies(args: argparse.Namespace) -> int:
    from attention import list_policies

    for name in list_policies():
        print(name)
    return 0


def cmd_envs(args: argparse.Namespace) -> int:
    from actors import list_env_families, list_games

    for family in list_env_families():
        games = list_games(family)
        print(f"{family}: {', '.join(games)}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="loupe", description="Train attention-augmented PPO agents and look inside them."
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and full tracebacks of internal errors")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="PPO training; writes and announces checkpoints")
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="a small end-to-end run on the embedded default")
    p.add_argument("--run-dir", type=path_arg, default=None,
                   help="new directory for the demo run (default: runs/demo-<date>-<time>)")  # fmt: skip
    p.add_argument("--total-steps", type=int_range(1024), default=32768, help="training steps")
    p.add_argument("--levels", type=int_range(1, 10_000_000), default=100,
                   help="evaluation levels per agent")  # fmt: skip
    p.add_argument("--workers", type=int_range(0, MAX_WORKERS), default=2,
                   help="Ray evaluators (0: in-process)")  # fmt: skip
    p.set_defaults(func=_demo)
    p = sub.add_parser("policies", help="list the policy networks")
    p.set_defaults(func=cmd_policies)
    p = sub.add_parser("envs", help="list environment families and games")
    p.set_defaults(func=cmd_envs)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


#: other modules append functions ``register(subparsers)`` here (probe, evaluate, bench, ...)
_EXTRA_COMMANDS: list = []


def _load_extra_commands() -> None:
    import importlib

    for module in (
        "loupe.cli.bench",
        "loupe.cli.probe",
        "loupe.cli.evaluate",
        "loupe.cli.compare",
        "loupe.cli.study",
        "loupe.cli.serve",
        "loupe.cli.view",
        "loupe.cli.soak",
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        if mod.register not in _EXTRA_COMMANDS:  # main() may run more than once in a process
            _EXTRA_COMMANDS.append(mod.register)


def main(argv: list[str] | None = None) -> int:
    """Run the `loupe` command -> its exit status (0 done, 1 internal error, 2 bad input)."""
    _load_extra_commands()
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or an argparse error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    interrupt.reset()
    if args.command in RESUMABLE:  # the same command continues; a command may say otherwise
        interrupt.resume_hint = "loupe " + shlex.join(sys.argv[1:] if argv is None else argv)
    with interrupt.handlers():  # SIGTERM takes the path of Ctrl-C: cleanup runs, then one line
        try:
            try:
                status = int(args.func(args) or 0)
            except BaseException as exc:  # a defect keeps Ray's logs: they may say what went wrong
                stop_local_ray(keep_logs=not isinstance(exc, (LoupeError, KeyboardInterrupt)))
                raise
            stop_local_ray()
        except LoupeError as exc:
            print(f"loupe: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            return interrupted(exc)
        except Exception as exc:  # a defect in loupe: one line, the traceback only with -v
            if args.verbose:
                traceback.print_exc()
            print(f"loupe: internal error: {internal_error_line(exc)}", file=sys.stderr)
            return 1
    return status


def internal_error_line(exc: BaseException) -> str:
    """One line for an unexpected exception: what, where, and how to report it."""
    text = " ".join(str(exc).split()) or "(no message)"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return (
        f"{type(exc).__name__}: {text}{where}. This is a defect in loupe: please report it with "
        "the command line and the output of the same command run with `loupe -v`"
    )


def stop_local_ray(keep_logs: bool = False) -> None:
    """Shut down the Ray this process started or joined (its raylet and GCS end with it).

    A local Ray's session directory goes with it, unless ``keep_logs``.
    """
    if sys.modules.get("ray") is not None:
        from loupe.distributed import shutdown_ray

        shutdown_ray(keep_logs=keep_logs)


#: commands whose interruption can be resumed by running the same command again
RESUMABLE = ("train", "probe", "evaluate", "study")


def interrupted(exc: KeyboardInterrupt) -> int:
    """One line for a SIGINT or SIGTERM that stopped the command -> exit status 128 + signal."""
    if not isinstance(exc, interrupt.Interrupted):
        exc = interrupt.Interrupted()
    hint = interrupt.resume_hint
    if hint != "":  # "": a worker process of a command that speaks for it
        resume = f"; to resume: {hint}" if hint else ""
        print(f"loupe: interrupted ({exc.name}){resume}", file=sys.stderr, flush=True)
    return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
