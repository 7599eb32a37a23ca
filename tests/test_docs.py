"""The docs' commands, run as a reader runs them: every ```bash and ```python block of README.md
and docs/*.md, in document order, from a fresh checkout of the repository, so that the text and
the behaviour cannot drift apart unnoticed.

Each such block carries, on the line before its fence (or the one after it: README's first
lines stay its two commands), a marker saying how it is tested:

    <!-- doc-test: run -->                       run as is (bash -e, or python); it must exit 0
    <!-- doc-test: background URL -->            a server in the foreground: started in the
                                                 background, ready when URL answers, stopped when
                                                 the next background block starts or the document ends
    <!-- doc-test: skip: why -->                 not run here (minutes of training, a GPU, a
                                                 cluster, a placeholder to fill in); why says so and
                                                 names the test covering it, if one does

The fast tier checks that every block has a marker (a new block must choose); the slow tier runs
them. The reader is the one the docs address: in a clone of the repository with the project
installed in `.venv` (here a link to the test's environment), the venv's bin on PATH (serving.md
says to activate it), the pipeline's default store `./.ddpm`, nothing else set. A document may
assume what an earlier step of the user's loop made (GIVEN: a short run of the README's first
command for serving.md, which promotes and serves what it trained).
"""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- doc-test: (run|background (\S+)|skip: (.+?)) -->\s*$")
RUNNABLE = ("bash", "python")

# What each document's reader has already done, run before its blocks (in the checkout's root).
GIVEN = {
    "docs/serving.md": [
        # the README's first command, shorter: a finished run in ./.ddpm to promote and serve
        ["ddpm", "train", "--steps", "40", "--num-samples", "64", "--fid-extractor", "classifier"],
    ],
}


def blocks(document: str) -> list[dict]:
    """The ```bash and ```python blocks of `document`: language, code, line, and their marker."""
    text = (REPO / document).read_text()
    found = []
    for match in FENCE.finditer(text):
        if match.group(1) not in RUNNABLE:
            continue
        line = text[:match.start()].count("\n") + 1
        # the line right before the fence, or right after it: never across a blank line, so a
        # block cannot borrow the marker of the next one
        before = text[:match.start()].removesuffix("\n").rsplit("\n", 1)[-1]
        after = text[match.end():].removeprefix("\n").split("\n", 1)[0]
        marker = MARKER.search(before) or MARKER.search(after)
        found.append({"language": match.group(1), "code": match.group(2), "line": line,
                      "mode": None if marker is None else marker.group(1).split()[0].rstrip(":"),
                      "url": marker and marker.group(2), "why": marker and marker.group(3)})
    return found


def test_every_command_block_of_the_docs_says_how_it_is_tested():
    unmarked = [f"{document}:{block['line']}" for document in DOCUMENTS for block in blocks(document)
                if block["mode"] is None]
    assert not unmarked, ("these blocks have no <!-- doc-test: run | background URL | skip: why --> on the line "
                          f"before or after their fence: {', '.join(unmarked)}")
    assert any(block["mode"] == "run" for document in DOCUMENTS for block in blocks(document))


def fresh_checkout(destination: Path) -> Path:
    """The repository's tracked files (as they are in the working tree) in `destination`, and `.venv`
    pointing at this interpreter's environment."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    (destination / ".venv").symlink_to(Path(sys.prefix))
    return destination


def reader_environment(checkout: Path) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DDPM_", "MLFLOW_", "PYTHONPATH"))}
    env["PATH"] = f"{checkout / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(checkout / ".venv")
    return env


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode} before {url} answered"
        if answers(url):
            return
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def stop(process: subprocess.Popen | None) -> None:
    """End a background block's whole process group (mlflow's server has a uvicorn child, which
    may outlive its parent)."""
    if process is None:
        return
    for signal_number in (15, 9):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            return
        try:
            process.wait(30)
            time.sleep(1)   # the group's other members, after the leader
        except subprocess.TimeoutExpired:
            continue


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("document", [d for d in DOCUMENTS if any(b["mode"] in ("run", "background")
                                                                   for b in blocks(d))])
def test_the_commands_of_a_document_work_as_written(document, tmp_path):
    checkout = fresh_checkout(tmp_path / "ddpm-pipeline")
    env = reader_environment(checkout)
    for command in GIVEN.get(document, []):
        given = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
        assert given.returncode == 0, f"{document} setup {command}: {given.stderr[-3000:]}"
    server = None
    try:
        for block in blocks(document):
            where = f"{document}:{block['line']}"
            if block["mode"] == "skip":
                continue
            command = ["bash", "-e", "-o", "pipefail", "-c", block["code"]] if block["language"] == "bash" else \
                [str(checkout / ".venv" / "bin" / "python"), "-c", block["code"]]
            if block["mode"] == "background":
                stop(server)
                assert not answers(block["url"]), f"{where}: something else already answers {block['url']}"
                server = subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
                wait_for(block["url"], server)
                continue
            done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{where} exited with {done.returncode}:\n{done.stdout[-2000:]}\n" \
                                         f"{done.stderr[-3000:]}"
    finally:
        stop(server)
