"""STOW-RS: send one result's objects to a DICOMweb server in one request (dicomweb-client).

The request goes to ``<url>/studies/<Study Instance UID>``, so the server also checks that every
object belongs to the study. dicomweb-client's own retries are switched off: the export queue
backs off between attempts and must see every failure.

How failures are classified (:class:`~fvlm_pacs.errors.ExportError` ``retryable``):

=================================================  =========  ==================================
what happened                                      retryable  why
=================================================  =========  ==================================
connection refused, timeout, connection dropped    yes        server down or busy
HTTP 5xx, 429 Too Many Requests, 408 timeout       yes        the server says "later"
HTTP 409/other 4xx whose Failed SOP Sequence       yes        out of resources (0xA7xx)
lists only 0xA7xx reasons
any other HTTP 4xx (400, 401, 403, 404, 409, 413,  no         request, credentials or objects
415, …)                                                       refused; retrying cannot help
2xx with a Failed SOP Sequence                     by reason  each Failure Reason classified
                                                              like a C-STORE status
                                                              (:func:`~.dimse.classify_status`)
2xx whose Referenced SOP Sequence misses an        yes        unacknowledged: send again
object we sent
=================================================  =========  ==================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from fvlm_pacs import config
from fvlm_pacs.errors import ExportError
from fvlm_pacs.export.base import Outgoing
from fvlm_pacs.export.dimse import classify_status, describe_status, read_files

log = logging.getLogger(__name__)

_RETRYABLE_HTTP = {408, 429}


def _response_dataset(response: requests.Response | None) -> Dataset | None:
    """The DICOM JSON body of a STOW-RS response, if it has one."""
    if response is None or not response.content:
        return None
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    try:
        return Dataset.from_json(body)
    except Exception:
        return None


def _reasons(dataset: Dataset | None) -> list[tuple[str, int]]:
    """(SOP Instance UID, Failure Reason) of every item in the Failed SOP Sequence."""
    if dataset is None:
        return []
    out = []
    for item in dataset.get("FailedSOPSequence", []) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", "?"))
        reason = item.get("FailureReason")
        out.append((uid, int(reason) if reason is not None else 0x0110))
    return out


def _describe(reasons: Sequence[tuple[str, int]]) -> str:
    shown = "; ".join(f"{uid}: 0x{r:04X} {describe_status(r)}" for uid, r in reasons[:5])
    return shown + (f" (+{len(reasons) - 5} more)" if len(reasons) > 5 else "")


class DicomwebDestination:
    """A DICOMweb server we STOW-RS to, with an optional bearer token."""

    def __init__(self, cfg: config.DicomwebDestination, *, timeout: float) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.timeout = timeout

    def send(self, outgoing: Outgoing) -> None:
        """POST every file in one multipart request; raise :class:`ExportError` unless all stored."""
        datasets = read_files(outgoing)
        if not datasets:
            return
        headers = {}
        if self.cfg.token is not None:
            headers["Authorization"] = f"Bearer {self.cfg.token.get_secret_value()}"
        with requests.Session() as session:
            try:
                client = DICOMwebClient(
                    self.cfg.url, session=session, headers=headers, timeout=self.timeout
                )
            except ValueError as exc:
                raise ExportError(f"{self.name}: bad DICOMweb URL: {exc}", retryable=False) from exc
            client.set_http_retry_params(retry=False)
            try:
                response = client.store_instances(
                    datasets, study_instance_uid=outgoing.study_instance_uid
                )
            except requests.HTTPError as exc:
                raise self._http_error(exc.response) from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise ExportError(
                    f"{self.name}: no response ({type(exc).__name__})", retryable=True
                ) from exc
            except requests.RequestException as exc:
                raise ExportError(
                    f"{self.name}: request failed ({type(exc).__name__})", retryable=False
                ) from exc
            except (ValueError, KeyError) as exc:  # the client could not decode the response
                raise ExportError(
                    f"{self.name}: unreadable response: {exc}", retryable=True
                ) from exc
        self._check_response(response, datasets)
        log.info("result %d: %d objects stored at %s", outgoing.result_id, len(datasets), self.name)

    def _http_error(self, response: requests.Response | None) -> ExportError:
        status = response.status_code if response is not None else 0
        reasons = _reasons(_response_dataset(response))
        retryable = status >= 500 or status in _RETRYABLE_HTTP
        if reasons and 400 <= status < 500:
            retryable = all(classify_status(r) == "retryable" for _, r in reasons)
        detail = f": {_describe(reasons)}" if reasons else ""
        return ExportError(
            f"{self.name}: STOW-RS answered HTTP {status}{detail}", retryable=retryable
        )

    def _check_response(self, response: Dataset, datasets: Sequence[Dataset]) -> None:
        failed = [(uid, r) for uid, r in _reasons(response) if classify_status(r) != "warning"]
        if failed:
            raise ExportError(
                f"{self.name} refused {len(failed)} of {len(datasets)} objects: "
                f"{_describe(failed)}",
                retryable=all(classify_status(r) == "retryable" for _, r in failed),
            )
        if "ReferencedSOPSequence" not in response:
            return  # 200 without a body: the HTTP status is all the server says
        stored = {
            str(item.get("ReferencedSOPInstanceUID", "")) for item in response.ReferencedSOPSequence
        }
        for item in response.ReferencedSOPSequence:
            if "WarningReason" in item:
                log.warning(
                    "%s stored %s with warning 0x%04X",
                    self.name,
                    item.get("ReferencedSOPInstanceUID", "?"),
                    int(item.WarningReason),
                )
        missing = [
            str(ds.SOPInstanceUID) for ds in datasets if str(ds.SOPInstanceUID) not in stored
        ]
        if missing:
            raise ExportError(
                f"{self.name} did not acknowledge {len(missing)} of {len(datasets)} objects",
                retryable=True,
            )
