"""The original report's model: a job recorded, updated and read back through the ORM."""

from __future__ import annotations

import time
from typing import Any

from django.db import models


class JobRecord(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    name = models.CharField(max_length=100, default="job")
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    result = models.TextField(blank=True, default="")
    #: how the job was run: sync, thread, pool, background, async
    runner = models.CharField(max_length=16, default="sync")
    create_username = models.CharField(max_length=150, default="system")
    update_username = models.CharField(max_length=150, default="system")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("-id",)

    def __str__(self) -> str:
        return f"{self.name} #{self.pk} ({self.status})"

    @classmethod
    def perform(
        cls, params: dict[str, Any], *, username: str = "ops", runner: str = "sync"
    ) -> JobRecord:
        """Run a job the way the original report did: create, update, read back.

        Every step is a real query, so conndiag sees (and classifies) each of them.
        """
        job = cls.objects.create(
            name=str(params.get("name", "job")),
            params=params,
            runner=runner,
            create_username=username,
            update_username=username,
        )
        job.status = cls.Status.RUNNING
        job.save(update_fields=["status", "updated_at"])
        delay = float(params.get("work_seconds", 0) or 0)
        if delay:
            time.sleep(min(delay, 2.0))
        job.status = cls.Status.DONE
        job.result = f"processed {len(params)} parameter(s)"
        job.update_username = username
        job.save(update_fields=["status", "result", "update_username", "updated_at"])
        return cls.objects.get(pk=job.pk)
