"""Order DreamerV3-style replay chunks into the streams they were recorded as.

DreamerV3 writes its replay as fixed-size chunks, one ``.npz`` per chunk, named
``{time}-{uuid}-{successor uuid}-{length}.npz``. A worker's chunks form a chain: each names the chunk that
continues its stream, so an episode that outgrows one chunk goes on in the next. Reading the chunks in name
order instead would cut every such episode in two (or join it to another worker's). :func:`chain_chunks` follows
the successor links; ``d4func import --join-chunks`` then splits each stream at its ``is_first`` flags.

A successor that is not among the files (the end of a stream, DreamerV3's all-zero uuid, or a chunk evicted from
its replay) ends the chain; a chunk whose predecessor is missing starts one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ChunkName", "chain_chunks", "parse_chunk_name"]


@dataclass(frozen=True)
class ChunkName:
    """What a chunk's file name says about it."""

    path: Path
    time: str
    uuid: str
    successor: str
    length: int


def parse_chunk_name(path: str | Path) -> ChunkName:
    """``{time}-{uuid}-{successor}-{length}.npz`` -> its parts; any other name is refused, naming the file."""
    path = Path(path)
    parts = path.stem.split("-")
    if len(parts) != 4 or not all(parts) or not parts[3].isdigit():
        raise ValueError(f"{str(path)!r} is not named like a DreamerV3 chunk, {{time}}-{{uuid}}-{{successor}}-"
                         "{length}.npz: import it without --join-chunks")
    time, uuid, successor, length = parts
    if uuid == successor:
        raise ValueError(f"chunk {str(path)!r} names itself as its successor")
    return ChunkName(path, time, uuid, successor, int(length))


def chain_chunks(files: Sequence[str | Path]) -> list[list[ChunkName]]:
    """The chunks' streams, each in recording order; streams ordered by their first chunk's time, then name.

    Refused, naming the files: two chunks with one uuid, two chunks that name the same successor (a stream
    cannot fork), and chunks that form a cycle.
    """
    chunks = [parse_chunk_name(file) for file in files]
    by_uuid: dict[str, ChunkName] = {}
    for chunk in chunks:
        if chunk.uuid in by_uuid:
            raise ValueError(f"chunks {str(by_uuid[chunk.uuid].path)!r} and {str(chunk.path)!r} share the uuid "
                             f"{chunk.uuid}")
        by_uuid[chunk.uuid] = chunk
    predecessor: dict[str, ChunkName] = {}
    for chunk in chunks:
        if chunk.successor in by_uuid:
            if chunk.successor in predecessor:
                raise ValueError(f"chunks {str(predecessor[chunk.successor].path)!r} and {str(chunk.path)!r} both "
                                 f"name {str(by_uuid[chunk.successor].path)!r} as their successor")
            predecessor[chunk.successor] = chunk
    heads = sorted((c for c in chunks if c.uuid not in predecessor), key=lambda c: (c.time, c.path.name))
    streams = []
    for head in heads:
        stream = [head]
        while stream[-1].successor in by_uuid:
            stream.append(by_uuid[stream[-1].successor])
        streams.append(stream)
    chained = sum(len(stream) for stream in streams)
    if chained != len(chunks):
        placed = {chunk.uuid for stream in streams for chunk in stream}
        loop = sorted(str(c.path) for c in chunks if c.uuid not in placed)
        raise ValueError(f"chunks {loop} form a cycle of successor links; no stream starts there")
    return streams
