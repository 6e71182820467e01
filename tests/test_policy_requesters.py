"""Who may ask (issue #22): DUCKLM_REQUESTERS, the default of the bot's own
people, invites on Matrix, DUCKLM_CHANNELS, and the start-up block."""

from __future__ import annotations

import pytest

from bot.policy import AccessPolicy
from runtime.settings import Settings

HOME_TEAM = "T0HOME001"
OTHER_TEAM = "T0OTHER01"


def homed(**kw: object) -> AccessPolicy:
    policy = AccessPolicy(**kw)  # type: ignore[arg-type]
    policy.set_home("slack", HOME_TEAM)
    policy.set_home("matrix", "Example.org")  # server names compare case-insensitively
    return policy


# -- the default: the bot's own people --------------------------------------------------


def test_default_lets_the_home_workspace_ask_and_refuses_slack_connect_guests() -> None:
    policy = homed()
    assert policy.may_ask("slack:U1", origin=HOME_TEAM)
    assert policy.may_ask("slack:U1", origin=None)  # no user_team: the event's own team
    assert not policy.may_ask("slack:U2", origin=OTHER_TEAM)


def test_default_lets_the_home_server_ask_and_refuses_federated_users() -> None:
    policy = homed()
    assert policy.may_ask("matrix:@alice:example.org")
    assert not policy.may_ask("matrix:@eve:evil.example")
    # a server whose name merely ends like ours is another server
    assert not policy.may_ask("matrix:@eve:notexample.org")
    assert not policy.may_ask("matrix:@eve:example.org.evil.example")


def test_before_a_platform_connected_only_certain_homes_count() -> None:
    policy = AccessPolicy()
    # Matrix: no home known yet, so nobody from Matrix is "home".
    assert not policy.may_ask("matrix:@alice:example.org")
    # Slack: an event without user_team is its own team's; a named team is unknown.
    assert policy.may_ask("slack:U1")
    assert not policy.may_ask("slack:U1", origin=OTHER_TEAM)
    # an unknown platform is never home
    assert not policy.may_ask("irc:alice")


def test_approvers_and_admins_may_always_ask() -> None:
    policy = homed(
        approvers=["matrix:@ops:partner.example", "slack:UAPPR"],
        admins=["slack:UADMIN"],
        requesters=["slack:UNOBODY"],
    )
    assert policy.may_ask("matrix:@ops:partner.example")
    assert policy.may_ask("slack:UAPPR", origin=OTHER_TEAM)
    assert policy.may_ask("slack:UADMIN", origin=OTHER_TEAM)
    assert not policy.may_ask("slack:USOMEONE", origin=HOME_TEAM)


# -- DUCKLM_REQUESTERS --------------------------------------------------------------------


def test_listed_requesters_replace_the_default() -> None:
    policy = homed(
        requesters=[
            "matrix:@alice:partner.example",
            "matrix:*:friends.example",
            "slack:T0PARTNER",
            "slack:UGUEST001",
        ]
    )
    assert policy.may_ask("matrix:@alice:partner.example")
    assert not policy.may_ask("matrix:@bob:partner.example")
    assert policy.may_ask("matrix:@anyone:FRIENDS.example")
    assert policy.may_ask("slack:U5", origin="T0PARTNER")
    assert policy.may_ask("slack:UGUEST001", origin=OTHER_TEAM)
    # the home is no longer implied once the list is set
    assert not policy.may_ask("matrix:@carol:example.org")
    assert not policy.may_ask("slack:U6", origin=HOME_TEAM)
    # platforms don't mix: a Matrix server entry says nothing about Slack ids
    assert not policy.may_ask("slack:U7", origin="friends.example")


def test_a_listed_slack_team_covers_events_without_user_team_when_it_is_home() -> None:
    policy = homed(requesters=[f"slack:{HOME_TEAM}"])
    assert policy.may_ask("slack:U1")  # origin None: the installing team
    assert policy.may_ask("slack:U1", origin=HOME_TEAM)
    assert not policy.may_ask("slack:U1", origin=OTHER_TEAM)


def test_star_lets_anyone_ask_and_is_warned_about() -> None:
    policy = homed(requesters=["*"])
    assert policy.may_ask("matrix:@eve:evil.example")
    assert policy.may_ask("slack:U9", origin=OTHER_TEAM)
    warnings = policy.startup_warnings()
    assert any("DUCKLM_REQUESTERS=*" in w and "ANYONE" in w for w in warnings)
    assert "anyone" in policy.startup_block()[0]
    assert not any("DUCKLM_REQUESTERS" in w for w in homed().startup_warnings())


def test_settings_read_the_lists_and_reject_what_cannot_match() -> None:
    settings = Settings(
        _env_file=None,
        requesters="matrix:@a:example.org, matrix:*:example.org slack:T024BE7LH slack:U024BE7LH",
        channels="slack:C024BE91L matrix:!room:example.org",
    )
    policy = AccessPolicy.from_settings(settings)
    assert policy.requesters == {
        "matrix:@a:example.org",
        "matrix:*:example.org",
        "slack:T024BE7LH",
        "slack:U024BE7LH",
    }
    assert policy.channels == {"slack:C024BE91L", "matrix:!room:example.org"}
    # A bare name would never match anybody, silently: refuse it at start instead.
    for bad in ("alice", "slack:alice", "matrix:example.org", "@alice:example.org"):
        with pytest.raises(ValueError, match="not a requester"):
            Settings(_env_file=None, requesters=bad)
    with pytest.raises(ValueError, match="not a channel"):
        Settings(_env_file=None, channels="#ops")
    with pytest.raises(ValueError, match="room id, not an alias"):
        Settings(_env_file=None, channels="matrix:#ops:example.org")


def test_the_refusal_names_the_user_and_the_setting() -> None:
    text = homed().refuse_ask_text("matrix:@eve:evil.example")
    assert "`matrix:@eve:evil.example`" in text
    assert "DUCKLM_REQUESTERS" in text
    assert len(text) < 300  # short: one private line


# -- invites and channels -----------------------------------------------------------------


def test_matrix_invites_need_may_ask_and_then_the_inviters_refinement() -> None:
    policy = homed()
    assert policy.may_invite("matrix:@alice:example.org")
    assert not policy.may_invite("matrix:@eve:evil.example")

    refined = homed(matrix_allowed_inviters=["@alice:example.org", ":partner.example"])
    assert refined.may_invite("matrix:@alice:example.org")
    assert not refined.may_invite("matrix:@bob:example.org")  # may ask, may not invite
    # the refinement never widens who may ask: partner.example may not ask
    assert not refined.may_invite("matrix:@pat:partner.example")

    wider = homed(
        requesters=["matrix:*:partner.example"],
        matrix_allowed_inviters=["matrix:partner.example"],
    )
    assert wider.may_invite("matrix:@pat:partner.example")
    # an approver (may always ask) may invite unless the refinement excludes them
    approver = homed(approvers=["matrix:@ops:elsewhere.example"])
    assert approver.may_invite("matrix:@ops:elsewhere.example")


def test_channels_restrict_where_the_bot_answers() -> None:
    everywhere = homed()
    assert everywhere.answers_in("slack", "CANY")
    listed = homed(channels=["slack:COPS", "matrix:!ops:example.org"])
    assert listed.answers_in("slack", "COPS")
    assert listed.answers_in("matrix", "!ops:example.org")
    assert not listed.answers_in("slack", "CRANDOM")
    assert not listed.answers_in("matrix", "COPS")  # the platform is part of the id


# -- the start-up block -------------------------------------------------------------------


def test_startup_block_names_who_may_ask_approve_and_administer() -> None:
    policy = homed(
        approvers=["slack:UAPPR"],
        admins=["matrix:@root:example.org"],
        channels=["slack:COPS"],
    )
    block = policy.startup_block()
    assert block[0] == (
        "who may ask: Matrix users on example.org and members of Slack workspace "
        f"{HOME_TEAM} (DUCKLM_REQUESTERS unset); approvers and admins too"
    )
    assert "who may approve: slack:UAPPR" in block
    assert "who may administer: matrix:@root:example.org" in block
    assert "answers in: slack:COPS (DUCKLM_CHANNELS)" in block

    closed = AccessPolicy().startup_block()
    assert "who may approve: nobody (DUCKLM_APPROVERS unset)" in closed
    assert "who may administer: nobody (DUCKLM_ADMINS unset)" in closed
    listed = homed(requesters=["slack:T0PARTNER", "matrix:*:example.org"]).startup_block()
    assert listed[0].startswith("who may ask: matrix:*:example.org, slack:T0PARTNER")
