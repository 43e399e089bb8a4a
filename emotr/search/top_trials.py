"""The best trials of a search as the console shows them: the objective whole, the params that vary.

Printed by `emotr run` and `emotr tune` at the end of a search, to a terminal or a log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from emotr.hyperparams import HeadParams
from emotr.search.report import SearchResult

# Short headers of the top-trials table; other head params show under their own name.
_SHORT = {"n_layers": "layers", "activation": "act", "dropout": "drop", "learning_rate": "lr"}
_SHORT |= {"batch_size": "batch", "standardize": "std", "class_weight": "cw"}
_SHORT |= {"kernel_init": "init", "early_stopping": "early stop", "finetune": "ft"}
_SHORT |= {
    "finetune_lr_scale": "ft lr",
    "finetune_epochs": "ft epochs",
    "finetune_patience": "ft pat",
}
_NAMES = list(HeadParams.model_fields)


def top_table(result: SearchResult, n: int = 5) -> TopTrials:
    """The n best complete trials with their val AUC in full and the head params that vary.

    Params equal in every trial shown (the fine-tuning ones of a search without fine-tuning)
    are left out: in a log or a narrow terminal they took the width the objective needed.
    """
    top = result.trials[result.trials["state"] == "COMPLETE"].nlargest(n, "value")
    cells = {
        name: [_cell(row.get(f"param_{name}")) for _, row in top.iterrows()] for name in _NAMES
    }
    varying = [name for name in _NAMES if len(set(cells[name])) > 1]
    rows = [
        (str(row["number"]), f"{row['value']:.4f}", [cells[name][index] for name in varying])
        for index, (_, row) in enumerate(top.iterrows())
    ]
    title = f"Top {len(top)} trials of study {result.study_name!r}"
    return TopTrials(title, [_SHORT.get(name, name) for name in varying], rows)


@dataclass(frozen=True)
class TopTrials:
    """The top trials as a table where it fits the console, else one line per trial.

    A table cut to the width of a log (80) or a narrow terminal folds or elides its cells
    (`0.8…`); a line per trial wraps between `name=value` pairs and keeps every number whole.
    """

    title: str
    headers: list[str]
    rows: list[tuple[str, str, list[str]]]  # trial number, val AUC, one cell per header

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """Render as a table when its natural width fits, else as lines."""
        table = self.table()
        # Measured unbounded: a table measured within the console's width says it fits.
        natural = Measurement.get(console, options.update_width(10_000), table).maximum
        if natural <= options.max_width:
            yield table
            return
        yield Text(self.title, style="italic")
        for number, value, cells in self.rows:
            pairs = "  ".join(f"{h}={c}" for h, c in zip(self.headers, cells, strict=True))
            yield Text(f"trial {number}  val AUC {value}  {pairs}".rstrip())
        yield Text(_CAPTION, style="dim")

    def table(self) -> Table:
        """The rich Table: trial, val AUC, then the params that vary."""
        table = Table(
            title=self.title,
            caption=_CAPTION,
            box=box.SIMPLE_HEAD,
            collapse_padding=True,
            show_edge=False,
        )
        table.add_column("trial", justify="right")
        table.add_column("val AUC", justify="right")
        for header in self.headers:
            table.add_column(header, justify="right")
        for number, value, cells in self.rows:
            table.add_row(number, value, *cells)
        return table


_CAPTION = "params equal in every trial shown are left out (all: the tune run's trials.csv)"


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.2g}" if isinstance(value, float) else str(value)
