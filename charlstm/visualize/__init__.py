"""`charlstm visualize`: what every unit and gate of a trained model does over a text (docs/visualize.md).

quantities: what is recorded per variant; recording: running the model (Recording, record);
analysis: unit ranking, gate saturation, colours; page: the HTML page (charlstm/assets);
command: the command itself.
"""

from .analysis import SATURATION_HIGH, SATURATION_LOW, colour_value, plot_saturation, rank_units, rgb, saturation
from .command import Visualization, free_path, parse_unit, read_text_arg, render_terminal, run_from_cli, visualize
from .page import build_page, page_data, quantize
from .quantities import GATES, QUANTITY_HELP, quantities_for, quantity_notes
from .recording import DEFAULT_TOP_K, Recording, gate_model, record

__all__ = [
    "DEFAULT_TOP_K", "GATES", "QUANTITY_HELP", "SATURATION_HIGH", "SATURATION_LOW", "Recording", "Visualization",
    "build_page", "colour_value", "free_path", "gate_model", "page_data", "parse_unit", "plot_saturation",
    "quantities_for", "quantity_notes", "quantize", "rank_units", "read_text_arg", "record", "render_terminal",
    "rgb", "run_from_cli", "saturation", "visualize",
]
