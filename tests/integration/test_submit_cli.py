"""`storyfarm submit` as a TD runs it, against a real daemon with fake workers (no model):

- several files: every file is checked before anything is sent, so one bad file submits nothing
  and the error names the file and the field (exit 2); a story the daemon refuses after others
  went in is reported per file, and the others still go (exit 5, EXIT_PARTIAL; --json lists both);
- reference images: the images a story file names, relative to the file, are uploaded with it as
  `storyfarm render` reads them, stored by the daemon and rendered from; a missing one is an error
  naming the story file and the image (exit 2, nothing sent);
- `--batch B`: request ids derive from the batch id and each story, so running the same command
  again (a lost reply, a re-run script) creates nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.daemon_inproc import running_daemon
from helpers.images import png
from storyfarm.daemon import cli
from storyfarm.daemon.cli_client import EXIT_BAD_INPUT, EXIT_PARTIAL
from storyfarm.daemon.client import StoryfarmClient

SMALL = "resolution: 64x32\nframes: 9\nsteps: 2\n"


def story(name: str, *prompts: str, extra: str = "") -> str:
    return f"name: {name}\n{SMALL}{extra}shots:\n" + "".join(f"  - prompt: {p}\n" for p in prompts)


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("data"), **{"scheduler.worker": "fake"}) as (d, _):
        with StoryfarmClient(f"127.0.0.1:{d.port}") as client:
            yield d, client


def run_cli(d, capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([*argv, "--server", f"127.0.0.1:{d.port}"])
    out, err = capsys.readouterr()
    return code, out, err


def names(client, **filters) -> list[str]:
    return [s["name"] for s in client.list(**filters)]


def test_one_bad_file_submits_nothing_and_names_the_file_and_field(farm, capsys, tmp_path):
    d, client = farm
    (tmp_path / "a.yaml").write_text(story("all-a", "a lighthouse at dusk"))
    (tmp_path / "bad.yaml").write_text(f"name: all-bad\n{SMALL}shots:\n  - prompt: ok\n  - promt: a typo\n")
    (tmp_path / "c.yaml").write_text(story("all-c", "a kite over the sea"))
    code, out, err = run_cli(d, capsys, "submit", *(str(tmp_path / n) for n in ("a.yaml", "bad.yaml", "c.yaml")), "--json")
    assert code == EXIT_BAD_INPUT and out == ""
    assert f"{tmp_path / 'bad.yaml'}: shots[1].promt" in err and f"{tmp_path / 'bad.yaml'}: shots[1].prompt" in err
    assert "a.yaml" not in err and "c.yaml" not in err  # only the bad file is named
    assert "nothing was submitted" in err
    assert not {"all-a", "all-bad", "all-c"} & set(names(client))  # all or nothing: a is not created


def test_a_story_the_daemon_refuses_is_reported_per_file(farm, capsys, tmp_path):
    """Valid here, refused by the daemon's preset (9 frames is 4n+1; 10 is not): a and c still go."""
    d, client = farm
    (tmp_path / "a.yaml").write_text(story("part-a", "a lighthouse at dusk"))
    (tmp_path / "frames.yaml").write_text(story("part-frames", "ten frames").replace("frames: 9", "frames: 10"))
    (tmp_path / "c.yaml").write_text(story("part-c", "a kite over the sea"))
    paths = [str(tmp_path / n) for n in ("a.yaml", "frames.yaml", "c.yaml")]
    code, out, err = run_cli(d, capsys, "submit", *paths, "--json")
    assert code == EXIT_PARTIAL
    entries = json.loads(out)
    assert [e["path"] for e in entries] == paths
    assert [e["created"] for e in entries] == [True, False, True]
    assert entries[0]["story_id"] and entries[2]["story_id"] and entries[1]["story_id"] is None
    assert entries[0]["error"] is None and entries[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert any(f.endswith("frames") for f, _ in entries[1]["error"]["field_violations"])
    assert f"error: {paths[1]}: INVALID_ARGUMENT" in err
    assert f"2 of 3 stories submitted; refused: {paths[1]}" in err
    assert {"part-a", "part-c"} <= set(names(client)) and "part-frames" not in names(client)


def test_the_images_a_story_names_are_uploaded_stored_and_rendered(farm, capsys, tmp_path):
    d, client = farm
    folder = tmp_path / "kite"
    (folder / "images").mkdir(parents=True)
    hero, sea = png(64, 64), png(48, 32)
    (folder / "images" / "hero.png").write_bytes(hero)
    (folder / "sea.png").write_bytes(sea)
    (folder / "kite.yaml").write_text(
        "name: refs-kite\n" + SMALL + "references: [images/hero.png]\nshots:\n"
        "  - prompt: the hero on the beach\n    references: {the sea: sea.png}\n  - prompt: the hero flies a kite\n")
    code, out, err = run_cli(d, capsys, "submit", str(folder / "kite.yaml"), "--wait", "--json")
    result = json.loads(out)
    assert code == 0, err
    assert result["created"] and result["state"] == "succeeded" and result["shot_count"] == 2
    stored = {p.name: p.read_bytes() for p in (Path(d.config.data_dir) / "references").glob("*/*.png")}
    assert stored.get("hero.png") == hero and stored.get("sea.png") == sea


def test_a_missing_image_names_the_story_file_and_the_image(farm, capsys, tmp_path):
    d, client = farm
    (tmp_path / "ok.yaml").write_text(story("missing-ok", "fine"))
    (tmp_path / "lost.yaml").write_text("name: missing-lost\n" + SMALL + "shots:\n  - prompt: p\n    references: [images/gone.png]\n")
    code, out, err = run_cli(d, capsys, "submit", str(tmp_path / "ok.yaml"), str(tmp_path / "lost.yaml"))
    assert code == EXIT_BAD_INPUT and out == ""
    assert f"{tmp_path / 'lost.yaml'}: shots[0].references[0]: reference image images/gone.png: no such file" in err
    assert str(tmp_path / "images" / "gone.png") in err
    assert not {"missing-ok", "missing-lost"} & set(names(client))


def test_an_explicit_reference_replaces_the_image_of_its_name(farm, capsys, tmp_path):
    """The old way still works: the story names hero.png, --reference brings it from elsewhere."""
    d, client = farm
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "hero.png").write_bytes(png(40, 40))
    (tmp_path / "s.yaml").write_text("name: explicit\n" + SMALL + "references: [hero.png]\nshots:\n  - prompt: p\n")
    code, _, err = run_cli(d, capsys, "submit", str(tmp_path / "s.yaml"), "--reference",
                           f"hero.png={tmp_path / 'elsewhere' / 'hero.png'}")
    assert code == 0, err
    assert "explicit" in names(client)


def test_the_same_batch_command_twice_creates_nothing_the_second_time(farm, capsys, tmp_path):
    d, client = farm
    for name, prompt in (("a", "a lighthouse at dusk"), ("c", "a kite over the sea")):
        (tmp_path / f"{name}.yaml").write_text(story(f"batch-{name}", prompt))
    command = ["submit", str(tmp_path / "a.yaml"), str(tmp_path / "c.yaml"), "--batch", "nightly-0412"]
    code, out, _ = run_cli(d, capsys, *command)
    assert code == 0 and out.count("created") == 2
    code, out, _ = run_cli(d, capsys, *command)
    assert code == 0 and out.count("already submitted") == 2 and "created" not in out
    code, out, _ = run_cli(d, capsys, "ls", "--batch", "nightly-0412", "--json")
    assert code == 0 and sorted(s["name"] for s in json.loads(out)) == ["batch-a", "batch-c"]
    code, _, err = run_cli(d, capsys, *command, "--priority", "9")  # not the same command: refused, not rendered again
    assert code == EXIT_BAD_INPUT and "IDEMPOTENCY_CONFLICT" in err
    assert sorted(names(client, batch_id="nightly-0412")) == ["batch-a", "batch-c"]
    # the same file twice in one batch is two stories, and stays two on a re-run
    twice = [*command[:2], *command[1:]]
    for _ in range(2):
        assert run_cli(d, capsys, *twice[:-1], "nightly-0413")[0] == 0
    assert sorted(names(client, batch_id="nightly-0413")) == ["batch-a", "batch-a", "batch-c"]

