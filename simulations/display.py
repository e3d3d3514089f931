"""Live console display of a simulation: a progress bar and one table row per round (rich)."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Short headers so the table fits 80 columns; README explains each.
COLUMNS = (
    ("round", "rnd", "{:d}"),
    ("global/accuracy", "acc", "{:.3f}"),
    ("clients/mean_accuracy", "cli_acc", "{:.3f}"),
    ("barrier/jensen_factor", "J_fac", "{:+.3f}"),
    ("barrier/jensen_product", "J_prod", "{:+.3f}"),
    ("barrier/pairwise_max", "barrier", "{:+.3f}"),
    ("aggregation/exactness_error", "exact", "{:.3f}"),
    ("comm/bytes_up", "MB_up", "{:.2f}"),
    ("time/round_s", "sec", "{:.0f}"),
)
#: The clients' own measurements (``diagnostics.where`` = clients or both, docs/methods.md): after
#: ``barrier`` with both; in place of the server's diagnostics (cli_acc ... barrier) with clients.
SERVER_DIAGNOSTICS = (
    "clients/mean_accuracy",
    "barrier/jensen_factor",
    "barrier/jensen_product",
    "barrier/pairwise_max",
)
LOCAL_COLUMNS = (
    ("local/jensen_gap", "J_loc", "{:+.3f}"),
    ("local/barrier_max", "b_loc", "{:+.3f}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if key == "comm/bytes_up":
        value = value / 1e6
    return fmt.format(value)


class RichRoundDisplay:
    """Round observer: prints each round as a table row under a live progress bar."""

    def __init__(
        self,
        num_rounds: int,
        title: str,
        console: Console | None = None,
        metric: str = "accuracy",
        where: str = "server",
    ) -> None:
        """``metric``: the task's headline metric, shown in the acc/cli_acc columns (e.g. token_accuracy);
        ``where``: the resolved ``diagnostics.where`` (clients, both: the J_loc, b_loc columns)."""
        self.console = console or Console(stderr=False)
        columns = list(COLUMNS)
        if where in ("clients", "both"):
            at = [key for key, _, _ in columns].index("barrier/pairwise_max") + 1
            columns[at:at] = LOCAL_COLUMNS
        if where == "clients":
            columns = [column for column in columns if column[0] not in SERVER_DIAGNOSTICS]
        self.columns = tuple(
            (key.replace("accuracy", metric) if key.endswith("accuracy") else key, header, fmt)
            for key, header, fmt in columns
        )
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(title, total=num_rounds)
        self.header_printed = False

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def __call__(self, row: dict) -> None:
        table = Table(show_header=not self.header_printed, box=None, pad_edge=False)
        for _, header, _ in self.columns:
            table.add_column(header, justify="right", min_width=7)
        table.add_row(*(_cell(row, key, fmt) for key, _, fmt in self.columns))
        self.progress.console.print(table)
        self.header_printed = True
        if row["round"] > 0:
            self.progress.advance(self.task)
