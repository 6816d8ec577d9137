"""Tests that query every configured database, for Django's parallel runner and
pytest-xdist: each class is a unit the runner may give to another (forked) worker."""

from __future__ import annotations

import os

from django.conf import settings
from django.db import connections, transaction
from django.test import Client, TestCase, TransactionTestCase

from tests.testapp.models import Item

ALIASES = sorted(settings.DATABASES)


class Writes(TestCase):
    databases = set(ALIASES)

    def test_create_and_count(self) -> None:
        for alias in ALIASES:
            Item.objects.using(alias).create(name="a")
            assert Item.objects.using(alias).count() == 1

    def test_bulk(self) -> None:
        for alias in ALIASES:
            Item.objects.using(alias).bulk_create([Item(name=str(i)) for i in range(5)])
            assert Item.objects.using(alias).filter(name__in=["1", "2"]).count() == 2


class Transactions(TestCase):
    databases = set(ALIASES)

    def test_rollback(self) -> None:
        for alias in ALIASES:
            try:
                with transaction.atomic(using=alias):
                    Item.objects.using(alias).create(name="gone")
                    raise ValueError
            except ValueError:
                pass
            assert not Item.objects.using(alias).filter(name="gone").exists()

    def test_raw_cursor(self) -> None:
        for alias in ALIASES:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT %s", [os.getpid()])
                assert int(cursor.fetchone()[0]) == os.getpid()


class Committed(TransactionTestCase):
    databases = set(ALIASES)

    def test_commit_then_read(self) -> None:
        for alias in ALIASES:
            Item.objects.using(alias).create(name="kept")
            assert list(Item.objects.using(alias).values_list("name", flat=True)) == ["kept"]

    def test_empty_again(self) -> None:
        for alias in ALIASES:
            assert Item.objects.using(alias).count() == 0


class Requests(TestCase):
    databases = set(ALIASES)

    def test_view(self) -> None:
        for alias in ALIASES:
            response = Client().get(f"/sync/?db={alias}")
            assert response.status_code == 200
            assert response.json() == {"count": 1}

    def test_between_requests(self) -> None:
        for alias in ALIASES:
            Client().get(f"/sync/?db={alias}")
            Item.objects.using(alias).create(name="between")
            assert Item.objects.using(alias).count() == 2
