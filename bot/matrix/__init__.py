"""Matrix, with matrix-nio (unencrypted rooms; no end-to-end encryption).

    connection  login, the sync loop, the dispatcher, invites and joins
    backlog     fetching what a sync did not carry (gaps, invite-to-join), bounded
    events      turning room events into service calls
    sending     posting events with retries, typing notices
    platform    `MatrixPlatform`: the three wired together, and the
                service's output (`ChatBackend`) for Matrix
    parsing     reading message bodies and reactions (pure)
    format      Markdown to Matrix HTML, approval cards (pure)
    state       the session and sync token on disk

Empty on purpose: importing a pure part does not load matrix-nio.
"""
