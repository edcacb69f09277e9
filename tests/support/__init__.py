"""Test support: real ZooKeeper and Redis servers, service processes, and waiting with deadlines.

Import as ``tests.support`` (``tests/conftest.py`` puts the repository root on ``sys.path``)::

    from tests.support.waiting import wait_for
"""
