"""`lmforge board [RUNS_DIR] [--port] [--allow-launch]`: a local web dashboard over output folders,
live while runs train (board/app.py for the routes, board/runs.py for what is read from the folders,
board/pages.py for the pages). It listens on localhost unless `--host` says otherwise."""

from __future__ import annotations

from pathlib import Path


def board(root: Path, host: str = "127.0.0.1", port: int = 8765, allow_launch: bool = False,
          recipes_dir: Path | None = None, say=print) -> None:
    import uvicorn

    from lmforge.board.app import build_board

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder of runs")
    say(f"board: {root.absolute()} on http://{host}:{port}/ (Ctrl-C stops it)"
        + ("; launching recipes is on" if allow_launch else ""))
    uvicorn.run(build_board(root, allow_launch, recipes_dir), host=host, port=port, log_level="warning")
