"""Matrix, with matrix-nio (unencrypted and end-to-end encrypted rooms).

    connection  login, the sync loop, the dispatcher, invites and joins
    backlog     fetching what a sync did not carry (gaps, invite-to-join), bounded
    events      turning room events into service calls
    sending     posting events with retries, typing notices
    platform    `MatrixPlatform`: the three wired together, and the
                service's output (`ChatBackend`) for Matrix
    parsing     reading message bodies and reactions (pure)
    format      Markdown to Matrix HTML, approval cards (pure)
    state       the session and sync token on disk
    crypto      end-to-end encryption: on or off (and why), the crypto store,
                the key traffic between syncs (nio e2e with vodozemac)
    crosssign   cross-signing the bot's own device (signedjson)
    trust       DUCKLM_MATRIX_TRUST: which devices get the bot's room keys
    reset       `ducklm matrix reset-crypto`

Empty on purpose: importing a pure part does not load matrix-nio.
"""
