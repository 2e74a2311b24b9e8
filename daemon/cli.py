"""The `storyfarm` command line.

Here: `render` (a whole story on this machine, no daemon; with `--shot N` a new take of shot N,
counting from 1 as everything people read and type does (story/numbering.py), of an earlier render,
optionally edited, see m2v.driver.rerender), `validate` (check a story file against
a preset without rendering) and `presets`; the commands that talk to a running daemon (submit,
watch, ls, get, ...) live in cli_client.py and register themselves into this parser. The CLI only
parses arguments, calls the layer below and prints; it holds no rendering logic. Exit codes: 0 done,
2 bad input (every problem printed with its field path), 1 a failure while rendering, 130
interrupted; the client commands add 3 (not found), 4 (not allowed) and 5 (`submit`: some stories in, some refused).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from storyfarm.daemon.cli_client import add_commands as add_client_commands
from storyfarm.daemon.cli_ops import add_ops_parser
from storyfarm.daemon.cli_serve import add_serve_parser
from storyfarm.daemon.cli_sim import add_simulate_parser
from storyfarm.daemon.cli_token import add_token_parser
from storyfarm.story.numbering import shot_label, shot_number

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _resolution(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 832x480, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storyfarm", description="Render multi-shot story videos (StoryMem M2V on Wan2.2).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="render one story here, without the daemon")
    render.add_argument("story", help="story file: StoryMem JSON or storyfarm YAML/JSON")
    render.add_argument("--preset", default="tiny", help="model preset name or YAML path (default: tiny)")
    render.add_argument("--out", required=True, help="output folder (new, empty, an earlier render, or an interrupted one to resume)")
    render.add_argument("--seed", type=int, help="story seed (shot i uses seed + i unless the shot sets its own)")
    render.add_argument("--steps", type=int, help="denoising steps for shots that do not set them")
    render.add_argument("--frames", type=int, help="frames per shot (4n+1) for shots that do not set them")
    render.add_argument("--resolution", type=_resolution, help="WIDTHxHEIGHT for shots that do not set it")
    render.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    render.add_argument("--threads", type=int, help="CPU threads for torch")
    render.add_argument("--quiet", action="store_true", help="no progress bars")
    edit = render.add_argument_group("re-render one shot of an earlier render in --out (a new take)")
    edit.add_argument("--shot", type=int, metavar="N", help="the number of the shot to render again (the first shot is 1)")
    edit.add_argument("--prompt", help="its edited prompt (default: its current one)")
    edit.add_argument("--strength", type=float, metavar="S",
                      help="0 < S <= 1: start from the previous take pushed S of the way back to noise (default 1)")
    edit.add_argument("--shot-seed", type=int, metavar="N", help="a seed for the new take (default: the shot's)")
    edit.add_argument("--cascade", action="store_true", help="also render every later shot again")

    validate = sub.add_parser("validate", help="check a story file without rendering")
    validate.add_argument("story")
    validate.add_argument("--preset", default="tiny", help="preset whose limits apply (default: tiny)")

    sub.add_parser("presets", help="list packaged model presets")
    add_serve_parser(sub)  # the daemon itself (cli_serve.py)
    add_simulate_parser(sub)  # the scheduler on a virtual clock (cli_sim.py)
    add_token_parser(sub)  # bearer tokens and their auth.tokens entries (cli_token.py)
    add_ops_parser(sub)  # the ops/ files for this site: alert rules with its runbook URL (cli_ops.py)
    add_client_commands(sub)  # submit, watch, ls, get, ... against a running daemon (cli_client.py)
    return parser


class RichProgress:
    """Two bars: shots of the story, denoising steps of the current shot. A RenderObserver
    (m2v.render.observe) by shape: the driver calls story_start, shot_start, stage, shot_done."""

    def __init__(self, console: Console):
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.console = console
        self.shots = self.steps = None
        self.count = None  # the story's shots, for "shot 2 of 3"
        self.label = "shot"  # the running shot's, for its bar

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def story_start(self, story, total_shots):
        self.count = len(story.shots)
        self.shots = self.bars.add_task(f"story {story.name[:40]}", total=total_shots)
        self.steps = self.bars.add_task("steps", total=1)

    def shot_start(self, shot, plan):
        self.label = shot_label(shot.index, self.count, shot.scene, shot.shot)
        self.bars.reset(self.steps, total=plan.sampler.steps, description=self.label)

    def stage(self, name, step=0, total=0, detail=""):
        # total from the sampler: a FIFO shot counts its base steps, then one step per output latent frame
        if name == "denoise" and total:
            self.bars.update(self.steps, completed=step, total=total, description=f"{self.label} steps [{detail}]")
        elif name != "denoise":  # decode, encode, keyframes: say so rather than sit at the last step
            self.bars.update(self.steps, description=f"{self.label} [{name.replace('_', ' ')}]")

    def shot_done(self, shot, entry):
        self.bars.advance(self.shots)
        secs = sum(entry["seconds"].values())
        self.console.log(
            f"{shot_label(shot.index)}: {entry['file']} ({entry['model']}, memory {len(entry['memory_keyframes'])}, "
            f"+{len(entry['new_keyframes'])} keyframes, {secs:.1f}s)"
        )


def _bad_input(console: Console, exc: Exception) -> int:
    console.print(f"[red]error[/red]: {exc}", markup=True, highlight=False)
    return EXIT_BAD_INPUT


def _story_and_preset(args, console: Console):
    """(story, preset) checked against the preset's limits, or None after printing the errors."""
    from storyfarm.story.presets import PresetError, load_preset
    from storyfarm.story.format import StoryValidationError, check_against_model, load_story

    try:
        preset = load_preset(args.preset)
        return check_against_model(load_story(args.story), preset.model_limits()), preset
    except (StoryValidationError, PresetError, OSError) as exc:
        _bad_input(console, exc)
        return None


def cmd_validate(args, console: Console) -> int:
    loaded = _story_and_preset(args, console)
    if loaded is None:
        return EXIT_BAD_INPUT
    story, preset = loaded
    cuts = sum(s.cut for s in story.shots)
    console.print(f"ok: {story.source}: {story.format} story {story.name!r}, {len(story.shots)} shots ({cuts} cuts), valid for preset {preset.name}")
    for warning in story.warnings:
        console.print(f"warning: {warning}")
    return EXIT_OK


def cmd_render(args, console: Console) -> int:
    from storyfarm.story.references import ReferenceImageError
    from storyfarm.story.format import StoryValidationError

    loaded = _story_and_preset(args, console)
    if loaded is None:
        return EXIT_BAD_INPUT
    story, preset = loaded

    from storyfarm.m2v.render.driver import RenderSettings, StoryRenderer
    from storyfarm.m2v.render.folder import check_output, earlier_render, render_identity
    from storyfarm.m2v.render.observe import Cancelled
    from storyfarm.story.modes import read_edit
    from storyfarm.story.numbering import shot_index

    # Everything about --out is checked here, before the model loads (minutes with real weights).
    settings = RenderSettings(seed=args.seed, steps=args.steps, frames=args.frames, resolution=args.resolution)
    edit, resumed, index = None, [], None
    try:
        if args.shot is None and (args.prompt or args.strength is not None or args.shot_seed is not None or args.cascade):
            raise ValueError("--prompt, --strength, --shot-seed and --cascade re-render one shot: give --shot N")
        if args.shot is not None:
            index = shot_index(args.shot, len(story.shots), name="--shot")
            edit = read_edit({"prompt": args.prompt, "strength": args.strength, "seed": args.shot_seed}, path="")
            earlier_render(args.out, story, index)  # the render whose shot is taken again
        else:
            resumed = check_output(args.out, render_identity(story, preset, settings))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        return _bad_input(console, exc)
    if resumed:
        console.print(f"resuming the interrupted render in {args.out}: shots 1 to {len(resumed)} of "
                      f"{len(story.shots)} are published and kept")

    import torch

    from storyfarm.m2v.render.engine import Engine

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return _bad_input(console, ValueError(f"--device {args.device}: no CUDA device is visible here (use --device cpu)"))

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    console.log(f"loading preset {preset.name} on {args.device}")
    engine = Engine(preset, device=args.device)
    console.log(f"models ready in {time.perf_counter() - t0:.1f}s")
    renderer = StoryRenderer(engine, settings)
    def run(progress=None):
        if args.shot is not None:
            return renderer.rerender(story, args.out, index, edit, cascade=args.cascade, observer=progress)
        return renderer.render(story, args.out, observer=progress)

    try:
        if args.quiet:
            manifest = run()
        else:
            with RichProgress(console) as progress:
                if args.shot is not None:
                    progress.story_start(story, 1 if not args.cascade else len(story.shots) - index)
                manifest = run(progress)
    except (StoryValidationError, ReferenceImageError, FileExistsError, FileNotFoundError, ValueError) as exc:
        return _bad_input(console, exc)
    except (KeyboardInterrupt, Cancelled):
        again = "run the same command again to resume" if args.shot is None else "manifest.json was not written"
        console.print(f"interrupted: shots finished so far are in {args.out}; {again}")
        return EXIT_INTERRUPTED
    if index is None:
        done = f"{len(manifest['shots'])} shots"
    elif args.cascade and shot_number(index) < len(story.shots):
        done = f"shots {shot_number(index)} to {len(story.shots)} re-rendered"
    else:
        done = f"{shot_label(index)} re-rendered"
    console.print(
        f"done: {done} in {manifest['seconds_total']:.1f}s -> {args.out}/story.mp4 "
        f"(manifest {args.out}/manifest.json)"
    )
    return EXIT_OK


def cmd_presets(args, console: Console) -> int:
    from storyfarm.story.presets import packaged_presets

    for name in packaged_presets():
        console.print(name)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=False, highlight=False)
    commands = {"render": cmd_render, "validate": cmd_validate, "presets": cmd_presets}
    run = commands.get(args.command) or args.run  # client commands carry their handler
    return run(args, console)


if __name__ == "__main__":
    sys.exit(main())
