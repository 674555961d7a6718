"""``manage.py dicom_scp``: the C-STORE SCP, a process of its own (Procfile ``dicom``)."""

import logging
import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand

from dicomnet.scp import StoreSCP

logger = logging.getLogger("dicomnet.scp")


class Command(BaseCommand):
    help = "Receive DICOM (C-STORE, C-ECHO) from the hospitals' registered nodes."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=settings.SIGHTLINE_DICOM_HOST)
        parser.add_argument("--port", type=int, default=settings.SIGHTLINE_DICOM_PORT)

    def handle(self, *args, host: str, port: int, **options):
        # pynetdicom's DEBUG output dumps datasets (patient identifiers): never below INFO here
        logging.getLogger("pynetdicom").setLevel(max(logging.INFO, logging.getLogger("pynetdicom").level))
        scp = StoreSCP()
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        scp.start(host=host, port=port, block=False)
        tls = "TLS" + (" with client certificates" if settings.SIGHTLINE_DICOM_TLS_CA else "")
        tls = tls if settings.SIGHTLINE_DICOM_TLS_CERT else "no TLS"
        # a log line (JSON where the logs are), not bare stdout: every line this process writes parses
        logger.info("DICOM SCP listening on %s:%s (%s)", host, port, tls)
        stop.wait()
        logger.info("DICOM SCP stopping")
        scp.shutdown()
