"""A torch extension build lock left by a killed process must not hang the next training run."""
import subprocess
import sys
import textwrap

from torch.utils.file_baton import FileBaton

from training.extension_lock import exclusive_builds, extensions_root


def test_a_lock_left_by_a_killed_build_is_removed_so_the_next_load_goes_ahead(tmp_path):
    root = tmp_path / "torch_extensions"
    stale = root / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True)
    # what torch's FileBaton leaves when its process is killed between try_acquire() and release()
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from torch.utils.file_baton import FileBaton
        assert FileBaton({str(stale)!r}).try_acquire()
        os.kill(os.getpid(), signal.SIGKILL)""")])
    assert killed.returncode == -9 and stale.exists()
    with exclusive_builds(root) as removed:
        assert removed == [stale]
        baton = FileBaton(str(stale))
        assert baton.try_acquire()             # torch's own load would now build instead of waiting forever
        baton.release()


def test_a_build_in_progress_in_another_worker_is_waited_for_not_broken(tmp_path):
    root = tmp_path / "torch_extensions"
    lock = root / "py311_cpu" / "op" / "lock"
    done = tmp_path / "built"
    # another worker holds the flock while its build holds torch's lock; it releases both when it is done
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from training.extension_lock import exclusive_builds
        with exclusive_builds(Path({str(root)!r})):
            lock = Path({str(lock)!r})
            lock.parent.mkdir(parents=True)
            lock.touch()
            print("building", flush=True)
            time.sleep(1.0)
            lock.unlink()
            Path({str(done)!r}).touch()
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "building"
    with exclusive_builds(root) as removed:
        assert done.exists() and removed == []     # entered only once the other build had finished
    assert holder.wait(timeout=30) == 0


def test_the_root_is_torchs_extension_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extensions_root().name == "torch_extensions"
