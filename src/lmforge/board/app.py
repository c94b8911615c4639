"""The board's HTTP routes (FastAPI): pages (board/pages.py) and the JSON they poll (board/runs.py).

- `/`: the runs under the root, live (status, progress, ETA, best metrics); tick runs to compare.
- `/run/ID`: a run's curves (loss, validation, lr, grad norm, tokens/s), log tail, samples, check, recipe.
- `/compare?run=A&run=B`: `lmforge report`'s page for those runs (eval/report.py: one code path).
- `/chat`: talk to a finished run's model, through `lmforge serve`'s engine (serve/app.py).
- `/launch`: a recipe and overrides, the command previewed; run only with `--allow-launch`.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from lmforge.board import pages
from lmforge.board.runs import BoardError, find_runs, resolve, run_detail, run_id, run_row, waiting_stage_rows


class ChatTurns(BaseModel):
    run: str
    messages: list[dict]
    max_tokens: int = 64
    temperature: float = 0.0


class Launch(BaseModel):
    recipe: str
    overrides: str = ""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def build_board(root: Path, allow_launch: bool = False, recipes_dir: Path | None = None) -> FastAPI:
    root = Path(root).absolute()
    app = FastAPI(title="lmforge board", docs_url=None, redoc_url=None)
    engines: dict[str, object] = {}
    engines_lock = threading.Lock()

    @app.exception_handler(BoardError)
    async def _missing(_: Request, exc: BoardError) -> JSONResponse:
        return _error(404, str(exc))

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return pages.RUNS

    @app.get("/api/runs")
    def runs() -> dict:
        return {"root": str(root), "runs": [run_row(root, f) for f in find_runs(root)] + waiting_stage_rows(root)}

    @app.get("/api/runs/{ident:path}")
    def run(ident: str) -> dict:
        return run_detail(root, resolve(root, ident))

    @app.get("/run/{ident:path}", response_class=HTMLResponse)
    def run_html(ident: str) -> str:
        resolve(root, ident)
        return pages.run_page(ident)

    @app.get("/compare", response_class=HTMLResponse)
    def compare(run: list[str] = Query(default=[])) -> HTMLResponse:
        from lmforge.eval.report import ReportError, render

        if not run:
            return HTMLResponse(pages.page("compare", "<p>Tick two or more runs on the <a href='/'>runs page</a>.</p>"))
        try:
            report = render([resolve(root, ident) for ident in run])
        except ReportError as exc:
            return HTMLResponse(pages.page("compare", f"<p>{exc}</p>"), status_code=400)
        return HTMLResponse(report.replace("<body>", "<body><p><a href='/'>&larr; runs</a></p>", 1))

    def models() -> list[dict]:
        from lmforge.models.factory import ModelError, is_model_folder, saved_head

        found = []
        for folder in find_runs(root):
            final = folder / "final"
            if not is_model_folder(final):
                continue
            try:
                if saved_head(final) == "causal_lm" and _has_chat_template(final):
                    found.append({"id": run_id(root, folder), "path": str(final)})
            except (ModelError, OSError, ValueError):
                continue
        return found

    @app.get("/api/models")
    def model_list() -> dict:
        return {"models": models()}

    @app.get("/chat", response_class=HTMLResponse)
    def chat_html() -> str:
        return pages.CHAT

    @app.post("/api/chat")
    def chat(turns: ChatTurns):
        from lmforge.serve.app import APIError, ChatRequest, Engine

        final = resolve(root, turns.run) / "final"
        if not _has_chat_template(final):
            return _error(400, f"{turns.run}: its model has no chat template (it was not instruction-tuned); the board "
                               "chats with the runs its chat page lists")
        with engines_lock:
            if turns.run not in engines:
                engines[turns.run] = Engine(final, name=turns.run)
            engine = engines[turns.run]
        request = ChatRequest(model=turns.run, messages=turns.messages, max_tokens=turns.max_tokens,
                              temperature=turns.temperature)
        try:
            generation = engine.plan(request)
        except APIError as exc:
            return _error(exc.status, exc.message)
        if not engine.worker.submit(generation):
            return _error(503, "the model is busy with other chats; try again shortly")
        generation.done.wait()  # the engine's worker answers (batched with any other chat)
        if generation.finish_reason == "error":
            return _error(500, f"generation failed: {generation.error}")
        return {"reply": generation.text, "finish_reason": generation.finish_reason,
                "completion_tokens": len(generation.new_ids)}

    def recipe_choices() -> list[str]:
        found = sorted(str(p.relative_to(root)) for p in root.glob("*.yaml"))
        if recipes_dir is not None and recipes_dir.is_dir():
            found += sorted(str(p) for p in recipes_dir.glob("*.yaml"))
        return found

    def command(launch: Launch) -> tuple[list[str], Path]:
        """The command and the folder it runs in. The root's own recipes run in the root. A bundled recipe names
        its data relative to the repository it ships in, so it runs there, its output_dir put under the root
        (where the board sees it) unless the overrides set one."""
        if launch.recipe not in recipe_choices():
            raise ValueError(f"recipe {launch.recipe!r}: not one of the board's recipes")
        try:
            overrides = shlex.split(launch.overrides)
        except ValueError as exc:
            raise ValueError(f"overrides: {exc}") from None
        bad = [o for o in overrides if "=" not in o or o.startswith("=")]
        if bad:
            raise ValueError(f"overrides: {', '.join(bad)} is not KEY=VALUE")
        if not Path(launch.recipe).is_absolute():  # one of the root's
            return ["lmforge", "run", launch.recipe, *overrides], root
        bundled = Path(launch.recipe)
        if not any(o.startswith("output_dir=") for o in overrides):
            overrides.append(f"output_dir={root / _output_dir(bundled)}")
        return ["lmforge", "run", str(bundled), *overrides], bundled.parent.parent

    @app.get("/launch", response_class=HTMLResponse)
    def launch_html() -> str:
        return pages.launch_page(recipe_choices(), allow_launch)

    @app.post("/api/launch/preview")
    def preview(launch: Launch):
        try:
            argv, cwd = command(launch)
        except ValueError as exc:
            return _error(400, str(exc))
        return {"command": shlex.join(argv), "cwd": str(cwd)}

    @app.post("/api/launch")
    def start(launch: Launch):
        if not allow_launch:
            return _error(403, "launching is off: start the board with --allow-launch")
        try:
            argv, cwd = command(launch)
        except ValueError as exc:
            return _error(400, str(exc))
        logs = root / "board-launches"
        logs.mkdir(exist_ok=True)
        log = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(launch.recipe).stem}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *argv[1:]], cwd=cwd, stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return {"pid": process.pid, "log": str(log), "command": shlex.join(argv), "cwd": str(cwd)}

    return app


def _has_chat_template(final: Path) -> bool:
    """Whether the saved tokenizer carries a chat template (in chat_template.jinja, or in its config)."""
    if (final / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((final / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def _output_dir(recipe: Path) -> str:
    """The output_dir a recipe names (relative: the board puts it under its root), else runs/NAME."""
    try:
        named = (yaml.safe_load(recipe.read_text()) or {}).get("output_dir")
    except (OSError, yaml.YAMLError, AttributeError):
        named = None
    if isinstance(named, str) and named and not Path(named).is_absolute():
        return named
    return f"runs/{recipe.stem}"
