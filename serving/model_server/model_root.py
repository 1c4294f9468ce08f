"""Where ``HandleReloadConfigRequest`` may point a model: under the model root, or at a base
path the server was started with.

A reload names each model's ``base_path``, and the server loads whatever SavedModel it finds
there, so a caller who could name any path could make the server run any graph on the machine.
Every reload is therefore checked before anything changes (security on or off): a path with a
``..`` component or a URI is INVALID_ARGUMENT; a path that, with symlinks resolved, lies outside
``model_root`` and is not one of the operator's start-up base paths is PERMISSION_DENIED. The
config file and the start-up flags are the operator's own and are not checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from tensorflow_serving.config import model_server_config_pb2

from serving.protocol.errors import InvalidArgument, PermissionDenied

_SHOWN = 200  # characters of a refused path quoted back


class ModelRoot:
    """The paths a reload may serve models from: anything under ``root`` (when given) and the
    exact base paths added with :meth:`allow` (the start-up config's)."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and self.root == Path(self.root.anchor):
            raise ValueError(f"model root {root} is the file system root, which would allow any path; name a folder")
        self._allowed: set[Path] = set()

    def allow(self, base_paths: Iterable[str]) -> None:
        self._allowed.update(Path(path).resolve() for path in base_paths)

    def check(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Raise unless every model of ``config`` lies where a reload may point it."""
        for model in config.model_config_list.config:
            raw = model.base_path
            shown = raw if len(raw) <= _SHOWN else raw[:_SHOWN] + "..."
            if "\x00" in raw:
                raise InvalidArgument(f"model {model.name}: base_path contains a NUL character")
            if "://" in raw:
                raise InvalidArgument(
                    f"model {model.name}: base_path {shown!r} is a URI; this server serves local paths"
                )
            if ".." in PurePosixPath(raw).parts:
                raise InvalidArgument(f"model {model.name}: base_path {shown!r} contains '..'; name the folder itself")
            resolved = Path(raw).resolve()
            if resolved in self._allowed or (self.root is not None and resolved.is_relative_to(self.root)):
                continue
            where = f"the model root {self.root}" if self.root is not None else "no model root"
            raise PermissionDenied(
                f"model {model.name}: base_path {shown!r} is outside the paths a reload may use ({where}, "
                "and the base paths the server started with); set model_server.model_root to the folder "
                "that holds the models"
            )
