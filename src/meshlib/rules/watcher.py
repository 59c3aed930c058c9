"""Follows the control plane's rules by long-poll and hands each new, valid version to the mesh.

The last good rules are kept on disk: a process started while the control plane is down begins with them, and a
control plane that goes down later changes nothing (the current rules simply stay in force). A version that does
not validate here (a newer schema, a corrupt answer) is logged and skipped; the previous rules stay in force.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

import httpx

from ..longpoll import LongPoller
from ..replicas import replica_client
from ..settings import split_urls
from ..state import StateDir, source_key
from ..wire import BadAnswer, bounded_json
from .model import Rules, RulesValidationError, validate_rules

log = logging.getLogger("meshlib.rules")


class RulesWatcher:
    def __init__(
        self,
        control_plane: str,
        on_rules: Callable[[Rules], None],
        state_dir: str | None = None,
        wait: float = 30.0,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        urls = split_urls(control_plane) or (control_plane.rstrip("/"),)
        #: One URL, or several replicas' (the watch moves to another when its replica fails; versions are shared).
        self.control_plane = ",".join(urls)
        self._on_rules = on_rules
        self._state = StateDir(state_dir) if state_dir else None
        # the last good rules are kept per control plane: another mesh's cache is never restored
        self.cache_file = f"rules-{source_key(self.control_plane)}.json"
        self.wait = wait
        self.version = 0
        self._seen = 0  # the newest version the server showed us, applied or rejected
        self._changed = threading.Condition()
        self._http = replica_client(
            urls,
            timeout=httpx.Timeout(5.0, read=wait * 17 / 16 + 5),
            trust_env=False,
            verify=verify,
        )
        self._poller = LongPoller("rules-watch", self._fetch, self._answer)

    def start(self) -> RulesWatcher:
        cached = self._state.load(self.cache_file) if self._state is not None else None
        if isinstance(cached, dict):
            try:
                rules = validate_rules(cached.get("rules"), int(cached.get("version", 0)))
                self._apply(rules)
                self._seen = rules.version
                log.info("starting from cached rules version %d", rules.version)
            except (RulesValidationError, TypeError, ValueError) as exc:
                log.warning("ignoring cached rules: %s", exc)
        self._poller.start()
        return self

    def _fetch(self, _index: int) -> tuple[int, Any]:
        # Versions start at 0, so the poller's Consul-style "index below 1 becomes 1" must not apply here: ask for
        # anything newer than the last version seen.
        response = self._http.get("/v1/rules", params={"index": self._seen, "wait": f"{self.wait:g}s"})
        response.raise_for_status()
        body = bounded_json(response)
        version = body.get("version") if isinstance(body, dict) else None
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise BadAnswer(f"{response.request.url}: the answer has no valid version")
        return version, body

    def _answer(self, index: int, body: Any) -> None:
        version = int(body.get("version", 0))
        self._seen = version
        if version == self.version:
            return  # the long-poll timed out: same version
        try:
            rules = validate_rules(body.get("rules"), version)
        except RulesValidationError as exc:
            log.error("rules version %d rejected, keeping version %d: %s", version, self.version, exc)
            return
        self._apply(rules)
        if self._state is not None:
            self._state.save(self.cache_file, {"version": version, "rules": body.get("rules") or {}})
        log.info("rules version %d applied", version)

    def _apply(self, rules: Rules) -> None:
        self._on_rules(rules)
        with self._changed:
            self.version = rules.version
            self._changed.notify_all()

    def wait_for_version(self, version: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.version >= version, timeout)

    def close(self) -> None:
        self._poller.stop()
        self._http.close()
