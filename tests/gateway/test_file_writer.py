"""The gateway's records written behind the event loop: in the order asked, a later write of a file replacing an
earlier one and a removal after a write removing it, readable by their owner only, all on disk once `settle`
returns, and a write the disk refuses said in the log, not raised."""

from __future__ import annotations

import stat

from sagellm.gateway.serving.file_writer import FileWriter


def test_writes_land_in_order_and_settle_waits_for_them(tmp_path):
    root = tmp_path / "records"
    writer = FileWriter.of(root)
    assert FileWriter.of(root) is writer  # one per directory
    for i in range(200):
        writer.write("a.json", str(i).encode())
    writer.write("b.json", b"kept")
    writer.write("c.json", b"gone")
    writer.remove("c.json")
    writer.settle()
    assert (root / "a.json").read_bytes() == b"199"
    assert (root / "b.json").read_bytes() == b"kept"
    assert not (root / "c.json").exists()
    assert stat.S_IMODE((root / "b.json").stat().st_mode) == 0o600


def test_a_refused_write_is_logged_and_the_next_one_lands(tmp_path, capfd):
    (tmp_path / "blocked").write_text("a file where the directory should be")
    blocked = FileWriter.of(tmp_path / "blocked")
    blocked.write("x.json", b"1")
    blocked.settle()
    said = capfd.readouterr()
    assert "state_write_failed" in said.out + said.err  # wherever the process's logging sends it
    fine = FileWriter.of(tmp_path / "fine")
    fine.write("x.json", b"2")
    fine.settle()
    assert (tmp_path / "fine" / "x.json").read_bytes() == b"2"
