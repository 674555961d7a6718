"""C-STORE SCP throughput: one association delivering a 100-instance CT series to ``manage.py dicom_scp``.

    .venv/bin/python bench/dicom_scp.py [--instances 100] [--size 512] [--json bench/dicom_scp.json]

A benchmark, not a test: it prints a table and writes JSON. It starts its own Redis and the SCP
process (``manage.py dicom_scp``, local settings, DEBUG off) on a temporary SQLite database (or
DATABASE_URL's PostgreSQL, which is then used as it is: point it at a throw-away database), with
the demo model registered, so each instance takes the whole ingest: header read, pixel check and
render in the SCP (native pixels, within the request decode budget), storage of the original and
the display copy, study/series/image/instance rows, two access-log entries, the AI read queued
(to the bench's Redis; no worker runs, so reads are queued, not made). The peer is DCMTK's
storescu (C++, another process): it sends ``--instances`` files of one series (``--size``² 16-bit
MONOCHROME2, Explicit VR Little Endian, about 0.5 MB each at 512²) in one association. Measured:
the wall time of storescu (association to release), instances/s and MB/s (file bytes); then the same
series sent again (every instance a duplicate: nothing stored). Rows are checked after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402  (the stack helpers of the main benchmark)
    BIN,
    Processes,
    demo_package,
    free_port,
    start_redis,
    wait_for_line,
)

HOSPITAL_AE, NODE_AE = "BENCH_HOSPITAL", "BENCH_CT"


def series(directory: Path, count: int, size: int) -> list[Path]:
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    study, series_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(15)
    base = rng.normal(40, 300, (size, size)).clip(-1024, 3071).astype("<i2")
    files = []
    for number in range(1, count + 1):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, series_uid, 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber, ds.AccessionNumber = number, "BENCH-1"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.roll(base, number, axis=0).tobytes()  # each slice its own pixels
        path = directory / f"ct-{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def storescu(port: int, files: list[Path]) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        ["storescu", "-aet", NODE_AE, "-aec", HOSPITAL_AE, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def run(args, workdir: Path, processes: Processes) -> dict:
    redis_port, dicom_port = free_port(), free_port()
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "DJANGO_DEBUG": "false",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SIGHTLINE_VAR_DIR": str(workdir),
        "SIGHTLINE_S3_BUCKET": "",
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    child_env = {**os.environ, **env}
    start_redis(processes, workdir, redis_port, child_env)

    import django

    django.setup()
    from types import SimpleNamespace

    from django.conf import settings
    from django.core.management import call_command

    from accounts.models import Role
    from accounts.services import membership_grant, tenant_create, user_get_or_create
    from dicomnet.models import Instance
    from dicomnet.nodes import dicom_node_create, hospital_ae_title_assign
    from recognition.models import Image, InferenceRequest, Study
    from workers.registration import model_version_register

    call_command("migrate", verbosity=0, interactive=False)
    tenant = tenant_create(name="Bench Hospital", slug="bench-hospital")
    user = user_get_or_create(username="bench-admin", password=secrets.token_urlsafe(12))
    admin = membership_grant(tenant=tenant, user=user, role=Role.TENANT_ADMIN)
    hospital_ae_title_assign(tenant=tenant, ae_title=HOSPITAL_AE)
    dicom_node_create(actor=admin, name="bench CT", ae_title=NODE_AE, host="127.0.0.1")
    model_version_register(package_path=demo_package(SimpleNamespace(workdir=workdir, say=print)))

    files = series(workdir / "series", args.instances, args.size)
    total_bytes = sum(path.stat().st_size for path in files)
    scp = processes.start(
        "dicom-scp",
        [str(BIN / "python"), "manage.py", "dicom_scp", "--host", "127.0.0.1", "--port", str(dicom_port)],
        child_env,
    )
    wait_for_line("DICOM SCP listening", scp, processes.log("dicom-scp"))

    first = storescu(dicom_port, files)
    stored = Instance.objects.filter(tenant=tenant).count()
    assert stored == args.instances, f"{stored} instances stored of {args.instances}"
    assert Study.objects.filter(tenant=tenant).count() == 1
    assert Image.objects.filter(tenant=tenant).count() == args.instances
    reads = InferenceRequest.objects.filter(image__tenant=tenant).count()
    again = storescu(dicom_port, files)
    assert Instance.objects.filter(tenant=tenant).count() == args.instances  # nothing twice

    megabytes = total_bytes / 1e6
    return {
        "instances": args.instances,
        "size": f"{args.size}x{args.size} 16-bit MONOCHROME2, Explicit VR Little Endian",
        "megabytes": round(megabytes, 1),
        "database": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
        "max_pdu": settings.SIGHTLINE_DICOM_MAX_PDU,
        "peer": "DCMTK storescu, one association",
        "cores": os.cpu_count(),
        "store": {
            "seconds": round(first, 2),
            "instances_per_s": round(args.instances / first, 1),
            "mb_per_s": round(megabytes / first, 1),
            "reads_queued": reads,
        },
        "duplicates": {
            "seconds": round(again, 2),
            "instances_per_s": round(args.instances / again, 1),
            "mb_per_s": round(megabytes / again, 1),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each slice")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "dicom_scp.json")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    assert shutil.which("storescu"), "DCMTK's storescu is not installed: make dicom-deps"
    workdir = Path(tempfile.mkdtemp(prefix="sightline-dicom-scp-"))
    processes = Processes(workdir / "logs")
    try:
        report = run(args, workdir, processes)
    finally:
        processes.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nC-STORE SCP, {report['instances']} instances ({report['size']}, {report['megabytes']} MB), ")
    print(f"{report['peer']}, {report['database']}, {report['cores']} cores:")
    for phase in ("store", "duplicates"):
        row = report[phase]
        rate = f"{row['instances_per_s']:>7} instances/s  {row['mb_per_s']:>6} MB/s"
        print(f"  {phase:<11} {row['seconds']:>7} s  {rate}")
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
