"""The draw-a-digit page (index.html) and the small server that serves it beside TorchServe (demo)."""
from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent
