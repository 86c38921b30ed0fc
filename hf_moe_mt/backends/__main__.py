"""`python -m hf_moe_mt.backends`: measure the CPU GEMM probe again (on a quiet machine) and replace this machine's
cached choice; prints what the CPU backend will use from now on."""

from .probe import CACHE_FILE, cache_dir, cached_or_measured, machine_key

if __name__ == "__main__":
    choice = cached_or_measured(machine_key(), again=True)
    print(f"{machine_key()}\n{choice.describe()}\nprobe took {choice.probe_seconds:.2f} s; cached in "
          f"{cache_dir() / CACHE_FILE}")
