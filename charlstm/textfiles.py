"""Reading a user's text files: only regular files (never a FIFO, a device or a socket, which would
hang or never end), UTF-8 decoded in bounded chunks, errors as one line naming the option."""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import CharlstmError

CHUNK_BYTES = 4 * 1024 * 1024   # bytes read and decoded at a time


def kind_of(mode: int) -> str:
    """'a FIFO', 'a character device', ... for a file mode that is not a regular file's."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(option: str, path: Path, mode: int) -> CharlstmError:
    return CharlstmError(f"{option} {path} is {kind_of(mode)}, not a regular file; give a UTF-8 text file")


def check_regular(path: Path, option: str, *, directory_ok: bool = False) -> os.stat_result:
    """The file's stat; CharlstmError (one line) when it is missing or not a regular file (or a
    directory, where ``directory_ok``)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CharlstmError(f"{option} {path} does not exist (no such file)") from None
    except OSError as e:
        raise CharlstmError(f"cannot read {option} {path}: {e.strerror or e}") from e
    if not (stat.S_ISREG(st.st_mode) or (directory_ok and stat.S_ISDIR(st.st_mode))):
        raise _not_regular(option, path, st.st_mode)
    return st


def open_regular(path: Path, option: str) -> BinaryIO:
    """The file opened for reading in binary; CharlstmError when it is not a regular file.

    Opened without blocking and checked on the open descriptor, so that a FIFO put in
    place after a check can never make the command wait for a writer."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CharlstmError(f"{option} {path} does not exist (no such file)") from None
    except IsADirectoryError:
        raise CharlstmError(f"{option} {path} is a directory; give one text file") from None
    except OSError as e:
        check_regular(path, option)            # a socket cannot be opened (ENXIO): say what it is
        raise CharlstmError(f"cannot read {option} {path}: {e.strerror or e}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise CharlstmError(f"{option} {path} is a directory; give one text file")
        raise _not_regular(option, path, mode)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def iter_text(path: Path, option: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The text of a regular UTF-8 file in pieces of about ``chunk_bytes``; CharlstmError naming the
    byte offset of the first undecodable byte. Memory is bounded by the chunk, whatever the file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0                                                    # bytes given to the decoder so far
    with open_regular(path, option) as f:
        while True:
            try:
                block = f.read(chunk_bytes)
            except OSError as e:
                raise CharlstmError(f"cannot read {option} {path}: {e.strerror or e}") from e
            buffered = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise CharlstmError(f"{option} {path} is not UTF-8 text: undecodable byte at offset "
                                    f"{fed - buffered + e.start}") from None
            fed += len(block)
            if text:
                yield text
            if not block:
                return


def read_text(path: Path, option: str) -> str:
    """The whole text of a regular UTF-8 file (for short inputs: a prime, a text to visualise)."""
    return "".join(iter_text(path, option))
