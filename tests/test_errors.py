"""Ray's wrappers come off the error that stopped a stage, whichever wrapper Ray used."""

from __future__ import annotations

import ray.exceptions

from semclust.errors import UserError, remote_cause


def test_a_task_error_and_an_actor_that_died_in_init_give_the_user_error():
    inner = UserError("embed.weights='x.pth' is not a checkpoint")
    task = ray.exceptions.RayTaskError("embed", "Traceback ...", inner)
    assert remote_cause(task) is inner
    died = ray.exceptions.ActorDiedError(task)  # __init__ raised: the actor never served
    assert remote_cause(died) is inner
    plain = ValueError("not from Ray")
    assert remote_cause(plain) is plain


def test_an_actor_lost_to_the_system_stays_what_it_is():
    lost = ray.exceptions.ActorDiedError()  # a killed node: no user error inside
    assert remote_cause(lost) is lost


def test_ray_datas_retry_note_is_not_part_of_the_message():
    from semclust.cli import explain

    note = (
        "\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s)."
        "\nTo change retry attempts, backoff, or which errors are retried, configure "
        "`ray.data.DataContext.get_current()` if you believe this to be transient."
    )
    code, message = explain(ConnectionResetError(104, "AWS Error NETWORK_CONNECTION" + note))
    assert code == 1 and "\n" not in message and "DataContext" not in message
    assert "AWS Error NETWORK_CONNECTION" in message and "--mode resume" in message


def test_the_error_inside_ray_datas_user_code_exception_is_the_one_reported():
    import errno

    from ray.exceptions import UserCodeException

    from semclust.cli import explain
    from semclust.errors import remote_cause

    disk_full = OSError(errno.ENOSPC, "No space left on device")
    try:
        raise UserCodeException("UDF failed to process a data block.") from disk_full
    except UserCodeException as wrapped:
        assert remote_cause(wrapped) is disk_full
        code, message = explain(wrapped)
    assert code == 1 and message.startswith("no space left on the device")
