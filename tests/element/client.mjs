// A person using Element, played by matrix-js-sdk (the library Element is built on),
// for DuckLM's Matrix tests (tests/element_client.py starts it).
//
//   node client.mjs            with ELEMENT_HOMESERVER, ELEMENT_USER_ID, ELEMENT_PASSWORD
//                              (ELEMENT_LOG_LEVEL=debug|info|warn for the SDK's log)
//   ELEMENT_CRYPTO=1           end-to-end encryption as Element does it: the SDK's Rust
//                              crypto (in memory: every start is a new device), the
//                              device cross-signed by its owner at login (Element's
//                              "set up secure messaging"), and, with
//                              ELEMENT_ISOLATION=only_signed, keys shared only with
//                              devices their owners cross-signed (Element's "exclude
//                              insecure devices", MSC4153)
//
// It logs in, syncs, and prints one JSON line per message on stdout:
//   {"ready": true, "user_id": ..., "device_id": ...}     once, after the first sync
//   {"event": {...raw event with room_id...}}             every event synced after that
//   {"id": N, "ok": true, "result": ...}                   the answer to command N
//   {"id": N, "ok": false, "error": "..."}
// Commands come as JSON lines on stdin: {"id": N, "cmd": "send", ...}. Everything the
// SDK logs goes to stderr, so stdout carries only these lines.
//
// Events are built the way Element builds them (element-web's SendMessageComposer,
// EditMessageComposer, ThreadView, Reply utils, emoji picker and "start DM on first
// message"), with matrix-js-sdk's own helpers where it has them. What Element does is
// noted beside each builder; the code is ours.

import { createRequire } from "node:module";
import readline from "node:readline";

// The SDK logs through loglevel, which writes to console.log: keep stdout for protocol
// lines only. This must run before the SDK is loaded.
for (const name of ["log", "info", "debug", "trace"]) {
    console[name] = (...args) => console.error(...args);
}

const sdk = await import("matrix-js-sdk");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
const { ClientEvent, ContentHelpers, Direction, EventType, Preset, SyncState, THREAD_RELATION_TYPE } = sdk;
logger.setLevel(process.env.ELEMENT_LOG_LEVEL || "warn");

// Element's emoji picker sends emojibase's `unicode` for the chosen emoji, which carries
// the variation selector U+FE0F (✅ is sent as U+2705 U+FE0F). Element keys its table by
// the emoji without selectors (src/emoji.ts), and so do we.
const require = createRequire(import.meta.url);
const EMOJIBASE = require("emojibase-data/en/compact.json");
const stripVariation = (text) => text.replace(/[\uFE00-\uFE0F]$/u, "");
const PICKER = new Map(EMOJIBASE.map((emoji) => [stripVariation(emoji.unicode), emoji.unicode]));

const SYNC_TIMEOUT_MS = 30000;

function out(message) {
    process.stdout.write(JSON.stringify(message) + "\n");
}

function need(args, name) {
    const value = args[name];
    if (value === undefined || value === null || value === "") {
        throw new Error(`missing "${name}"`);
    }
    return value;
}

function escapeHtml(text) {
    return text
        .replace(/&/g, "&amp;")
        .replace(/</g, "&lt;")
        .replace(/>/g, "&gt;")
        .replace(/"/g, "&quot;")
        .replace(/'/g, "&#39;");
}

// -- log in ------------------------------------------------------------------------

const baseUrl = need(process.env, "ELEMENT_HOMESERVER");
const userId = need(process.env, "ELEMENT_USER_ID");
const password = need(process.env, "ELEMENT_PASSWORD");

const login = await sdk.createClient({ baseUrl }).loginRequest({
    type: "m.login.password",
    identifier: { type: "m.id.user", user: userId },
    password,
    initial_device_display_name: "Element (DuckLM tests, matrix-js-sdk)",
});

const client = sdk.createClient({
    baseUrl,
    userId: login.user_id,
    accessToken: login.access_token,
    deviceId: login.device_id,
    timelineSupport: true,
});

const withCrypto = process.env.ELEMENT_CRYPTO === "1";
if (withCrypto) {
    await client.initRustCrypto({ useIndexedDB: false });
    const crypto = client.getCrypto();
    // Element sets up cross-signing for a new account; the first upload of a user's
    // keys needs no interactive auth on Synapse (MSC3967), a later one the password.
    // ELEMENT_CROSS_SIGN=0: a device its owner never cross-signed (an old or third-party client).
    if (process.env.ELEMENT_CROSS_SIGN !== "0") await crypto.bootstrapCrossSigning({
        authUploadDeviceSigningKeys: async (makeRequest) => {
            await makeRequest({
                type: "m.login.password",
                identifier: { type: "m.id.user", user: login.user_id },
                password,
            });
        },
    });
    if (process.env.ELEMENT_ISOLATION === "only_signed") {
        const { OnlySignedDevicesIsolationMode } = await import("matrix-js-sdk/lib/crypto-api/index.js");
        crypto.setDeviceIsolationMode(new OnlySignedDevicesIsolationMode());
    }
}

// Every event the client syncs after its first sync, once each: the test side keeps
// them and waits on them. Waiters registered by the `wait_for` command are checked too.
const seen = [];
const seenIds = new Set();
const waiters = new Set();
let live = false;

function record(event) {
    // An encrypted event is recorded once its decryption is over (MatrixEvent's
    // "Event.decrypted", below): as the clear event, or as m.room.encrypted if it failed.
    if (event.isBeingDecrypted?.() || event.shouldAttemptDecryption?.()) return;
    const raw = event.getEffectiveEvent ? event.getEffectiveEvent() : event.event;
    const roomId = raw?.room_id ?? event.getRoomId?.();
    if (!live || !raw || !roomId) return;
    // The state of a room one is invited to comes stripped, without an event id.
    const copy = JSON.parse(JSON.stringify({ ...raw, room_id: roomId }));
    const key = copy.event_id ?? JSON.stringify(copy);
    if (seenIds.has(key)) return;
    seenIds.add(key);
    seen.push(copy);
    out({ event: copy });
    for (const waiter of waiters) {
        if (matches(copy, waiter.pattern)) waiter.resolve(copy);
    }
}

client.on(ClientEvent.Event, record);
client.on("Event.decrypted", (event) => {
    // A failure is retried when keys arrive (the SDK emits again): record only the
    // outcome that is final, the clear event; a failure shows as `undecryptable`.
    if (event.isDecryptionFailure()) {
        const roomId = event.getRoomId();
        if (live && roomId) out({ undecryptable: { event_id: event.getId(), room_id: roomId, reason: String(event.decryptionFailureReason ?? "") } });
        return;
    }
    record(event);
});

await new Promise((resolve, reject) => {
    const onSync = (state, _previous, data) => {
        if (state === SyncState.Prepared || state === SyncState.Syncing) {
            client.removeListener(ClientEvent.Sync, onSync);
            resolve();
        } else if (state === SyncState.Error) {
            client.removeListener(ClientEvent.Sync, onSync);
            reject(data?.error ?? new Error("the first sync failed"));
        }
    };
    client.on(ClientEvent.Sync, onSync);
    // threadSupport as in Element: thread replies are kept in their thread's timeline.
    // Pending events detached, as Element starts its client (MatrixClientPeg): with the
    // default "chronological" ordering a remote echo that comes down the sync before the
    // send's own response leaves the local echo without a status, and the SDK then
    // throws "updatePendingEventStatus called on an event which is not a local echo".
    client.startClient({
        initialSyncLimit: 20,
        threadSupport: true,
        pendingEventOrdering: sdk.PendingEventOrdering.Detached,
        pollTimeout: SYNC_TIMEOUT_MS,
    });
});
live = true;

// -- matching ------------------------------------------------------------------------

// `pattern` is a subset of the event: every key must be there with an equal value;
// objects are compared key by key; {"$contains": "text"} matches a string holding text;
// {"$absent": true} matches a missing key.
function matches(value, pattern) {
    if (pattern !== null && typeof pattern === "object" && !Array.isArray(pattern)) {
        if ("$contains" in pattern) {
            return typeof value === "string" && value.includes(pattern.$contains);
        }
        if (value === null || typeof value !== "object") return false;
        return Object.entries(pattern).every(([key, want]) => {
            if (want !== null && typeof want === "object" && want.$absent) return !(key in value);
            return key in value && matches(value[key], want);
        });
    }
    return JSON.stringify(value) === JSON.stringify(pattern);
}

function waitFor(pattern, timeoutMs) {
    const found = seen.find((event) => matches(event, pattern));
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
        const waiter = {
            pattern,
            resolve: (event) => {
                clearTimeout(timer);
                waiters.delete(waiter);
                resolve(event);
            },
        };
        const timer = setTimeout(() => {
            waiters.delete(waiter);
            reject(new Error(`no event matching ${JSON.stringify(pattern)} within ${timeoutMs} ms`));
        }, timeoutMs);
        waiters.add(waiter);
    });
}

// -- building events as Element does ----------------------------------------------------

// The name a pill shows: the room member's name, or (for someone this client has not
// synced into the room yet, e.g. just invited) the profile's display name, as Element's
// autocomplete offers it.
async function displayName(roomId, who) {
    const member = client.getRoom(roomId)?.getMember(who);
    if (member?.name) return member.name;
    try {
        return (await client.getProfileInfo(who)).displayname || who;
    } catch {
        return who;
    }
}

// The composer's text with pills in front, as Element's autocomplete inserts them: a
// user pill at the start of the composer is followed by ": ". The body carries the
// pills' display names (textSerialize); formatted_body links them to matrix.to
// (mdSerialize + commonmark), and m.mentions lists them (attachMentions), never the
// sender itself. Element always sends m.mentions, empty when nobody is mentioned.
async function composed(roomId, text, pills = []) {
    const names = await Promise.all(pills.map((who) => displayName(roomId, who)));
    const prefix = pills.length ? names.join(" ") + ": " : "";
    const body = prefix + text;
    let content;
    if (pills.length) {
        const links = pills.map(
            (who, i) => `<a href="https://matrix.to/#/${encodeURI(who)}">${escapeHtml(names[i])}</a>`,
        );
        content = ContentHelpers.makeHtmlMessage(body, links.join(" ") + ": " + escapeHtml(text));
    } else {
        content = ContentHelpers.makeTextMessage(body);
    }
    const mentioned = [...new Set(pills)].filter((who) => who !== client.getUserId());
    content["m.mentions"] = mentioned.length ? { user_ids: mentioned } : {};
    return content;
}

// The legacy reply fallback (Element until late 2024, and many clients still): the
// replied-to message quoted in body and an <mx-reply> block in formatted_body.
// Element's current builds send only m.in_reply_to (MSC2781); `fallback: true` asks for it.
function addReplyFallback(content, roomId, parent) {
    const parentContent = parent.content || {};
    const parentBody = String(parentContent.body || "");
    const parentHtml = parentContent.formatted_body || escapeHtml(parentBody).replace(/\n/g, "<br/>");
    const eventLink = `https://matrix.to/#/${encodeURIComponent(roomId)}/${encodeURIComponent(parent.event_id)}`;
    const userLink = `https://matrix.to/#/${parent.sender}`;
    const ownHtml = content.formatted_body || escapeHtml(content.body);
    const lines = parentBody.trim().split("\n");
    lines[0] = `<${parent.sender}> ${lines[0]}`;
    content.body = lines.map((line) => `> ${line}`).join("\n") + "\n\n" + content.body;
    content.format = "org.matrix.custom.html";
    content.formatted_body =
        `<mx-reply><blockquote><a href="${eventLink}">In reply to</a> <a href="${userLink}">${parent.sender}</a>` +
        `<br>${parentHtml}</blockquote></mx-reply>` +
        ownHtml;
}

async function fetchEvent(roomId, eventId) {
    const known = seen.find((event) => event.event_id === eventId);
    if (known) return known;
    return await client.fetchRoomEvent(roomId, eventId);
}

// ThreadView's threadRelation: m.thread to the root, is_falling_back, and m.in_reply_to
// the thread's latest reply (or the root) for clients without threads.
// The latest reply this client synced (in sync order) comes first: the SDK's thread
// model fills in lazily and may not have it yet.
function threadRelation(roomId, root) {
    const thread = client.getRoom(roomId)?.getThread(root);
    const latest = latestInThread(roomId, root) ?? thread?.lastReply()?.getId() ?? root;
    return {
        rel_type: THREAD_RELATION_TYPE.name,
        event_id: root,
        is_falling_back: true,
        "m.in_reply_to": { event_id: latest },
    };
}

function latestInThread(roomId, root) {
    const inThread = seen.filter(
        (event) =>
            event.room_id === roomId &&
            event.type === EventType.RoomMessage &&
            event.content?.["m.relates_to"]?.rel_type === THREAD_RELATION_TYPE.name &&
            event.content?.["m.relates_to"]?.event_id === root,
    );
    return inThread.length ? inThread[inThread.length - 1].event_id : undefined;
}

async function send(args) {
    const roomId = need(args, "room_id");
    const content = await composed(roomId, need(args, "text"), args.pills || []);
    if (args.emote) content.msgtype = "m.emote";
    let threadId = null;
    if (args.thread) {
        threadId = args.thread;
        content["m.relates_to"] = threadRelation(roomId, args.thread);
    }
    if (args.reply_to) {
        // addReplyToMessageContent: m.in_reply_to the parent (is_falling_back false when
        // the reply is inside a thread), the parent's sender added to m.mentions.
        const parent = await fetchEvent(roomId, args.reply_to);
        const relation = { ...(content["m.relates_to"] || {}), "m.in_reply_to": { event_id: args.reply_to } };
        if (threadId) relation.is_falling_back = false;
        content["m.relates_to"] = relation;
        if (parent.sender !== client.getUserId()) {
            const users = new Set([parent.sender, ...(content["m.mentions"].user_ids || [])]);
            content["m.mentions"] = { user_ids: [...users] };
        }
        if (args.fallback) addReplyFallback(content, roomId, parent);
    }
    const response = await client.sendEvent(roomId, threadId, EventType.RoomMessage, content);
    return { event_id: response.event_id, content };
}

// EditMessageComposer.createEditContent: " * " before the body, the whole new message in
// m.new_content (with its own full m.mentions), the outer m.mentions only for users the
// original did not mention yet, and an m.replace relation.
async function edit(args) {
    const roomId = need(args, "room_id");
    const original = await fetchEvent(roomId, need(args, "event_id"));
    const fresh = await composed(roomId, need(args, "text"), args.pills || []);
    const newContent = { msgtype: fresh.msgtype, body: fresh.body };
    const content = { msgtype: fresh.msgtype, body: `* ${fresh.body}`, "m.new_content": newContent };
    if (fresh.formatted_body) {
        newContent.format = content.format = "org.matrix.custom.html";
        newContent.formatted_body = fresh.formatted_body;
        content.formatted_body = `* ${fresh.formatted_body}`;
    }
    newContent["m.mentions"] = fresh["m.mentions"];
    const before = new Set(original.content?.["m.mentions"]?.user_ids || []);
    const added = (fresh["m.mentions"].user_ids || []).filter((who) => !before.has(who));
    content["m.mentions"] = added.length ? { user_ids: added } : {};
    content["m.relates_to"] = { rel_type: "m.replace", event_id: original.event_id };
    const relation = original.content?.["m.relates_to"];
    const threadId = relation?.rel_type === THREAD_RELATION_TYPE.name ? relation.event_id : null;
    const response = await client.sendEvent(roomId, threadId, EventType.RoomMessage, content);
    return { event_id: response.event_id, content };
}

// The reaction picker (and its quick reactions) send emojibase's form of the emoji;
// `key` sends a key exactly as given instead (another client, or a typed reaction).
async function react(args) {
    const roomId = need(args, "room_id");
    const target = need(args, "event_id");
    let key = args.key;
    if (key === undefined) {
        const emoji = need(args, "emoji");
        key = PICKER.get(stripVariation(emoji));
        if (!key) throw new Error(`${JSON.stringify(emoji)} is not in Element's emoji picker`);
    }
    const content = { "m.relates_to": { rel_type: "m.annotation", event_id: target, key } };
    const response = await client.sendEvent(roomId, EventType.Reaction, content);
    return { event_id: response.event_id, key };
}

// `encrypted` creates the room with m.room.encryption as Element does by default (send
// there only with ELEMENT_CRYPTO=1).
async function createRoom(args) {
    // Element's "create a room" dialog: a private room; people are invited afterwards.
    const options = { preset: Preset.PrivateChat, visibility: "private", name: args.name || "test room" };
    if (args.encrypted) {
        options.initial_state = [
            { type: EventType.RoomEncryption, state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } },
        ];
    }
    const { room_id: roomId } = await client.createRoom(options);
    for (const who of args.invite || []) await client.invite(roomId, who);
    return { room_id: roomId };
}

// "Start DM on first message": Element shows a local room, and when the first message
// is sent it creates the real room (trusted_private_chat, is_direct, the other person
// invited in createRoom), marks it in m.direct, and sends the message at once, without
// waiting for the other side to join. Element encrypts a new DM only when every invitee
// has device keys; `encrypted` forces it.
async function startDm(args) {
    const other = need(args, "user_id");
    const options = { preset: Preset.TrustedPrivateChat, visibility: "private", is_direct: true, invite: [other] };
    if (args.encrypted) {
        options.initial_state = [
            { type: EventType.RoomEncryption, state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } },
        ];
    }
    const { room_id: roomId } = await client.createRoom(options);
    const direct = client.getAccountData(EventType.Direct)?.getContent() || {};
    direct[other] = [...(direct[other] || []), roomId];
    await client.setAccountData(EventType.Direct, direct);
    const content = await composed(roomId, need(args, "text"), args.pills || []);
    const response = await client.sendEvent(roomId, EventType.RoomMessage, content);
    return { room_id: roomId, event_id: response.event_id, content };
}

// The room's events as the server has them (newest last), through /messages, for counts
// that must not depend on what this client happened to sync.
async function roomEvents(args) {
    const roomId = need(args, "room_id");
    const limit = Math.min(Number(args.limit || 500), 2000);
    const events = [];
    let from = null;
    while (events.length < limit) {
        const page = await client.createMessagesRequest(roomId, from, 100, Direction.Backward);
        for (const event of page.chunk || []) events.push({ ...event, room_id: roomId });
        if (!page.end || !page.chunk?.length) break;
        from = page.end;
    }
    return events.slice(0, limit).reverse();
}

const COMMANDS = {
    create_room: createRoom,
    start_dm: startDm,
    invite: async (args) => (await client.invite(need(args, "room_id"), need(args, "user_id")), {}),
    // Room settings → Security → Encrypted: m.room.encryption in a room that had none.
    enable_encryption: async (args) => (
        await client.sendStateEvent(need(args, "room_id"), EventType.RoomEncryption, { algorithm: "m.megolm.v1.aes-sha2" }, ""),
        {}
    ),
    join: async (args) => (await client.joinRoom(need(args, "room_id")), {}),
    send,
    edit,
    react,
    wait_for: (args) => waitFor(need(args, "pattern"), Number(args.timeout_ms || 20000)),
    events: roomEvents,
    // How this client's crypto sees a device (null: it has no view of it yet).
    device_status: async (args) => {
        const status = await client.getCrypto().getDeviceVerificationStatus(need(args, "user_id"), need(args, "device_id"));
        if (!status) return { known: false };
        return {
            known: true,
            signed_by_owner: status.signedByOwner,
            cross_signing_verified: status.crossSigningVerified,
            locally_verified: status.localVerified,
        };
    },
    // Fetch the user's device list again (as Element does when it is told it changed).
    refresh_devices: async (args) => (await client.getCrypto().getUserDeviceInfo([need(args, "user_id")], true), {}),
    stop: async () => ({}),
};

out({ ready: true, user_id: client.getUserId(), device_id: client.getDeviceId() });

const lines = readline.createInterface({ input: process.stdin });

lines.on("line", (line) => {
    if (!line.trim()) return;
    let request;
    try {
        request = JSON.parse(line);
    } catch (error) {
        out({ id: null, ok: false, error: `not JSON: ${error.message}` });
        return;
    }
    const handler = COMMANDS[request.cmd];
    (async () => {
        if (!handler) throw new Error(`unknown command ${JSON.stringify(request.cmd)}`);
        return await handler(request);
    })().then(
        (result) => {
            out({ id: request.id, ok: true, result: result ?? {} });
            if (request.cmd === "stop") finish();
        },
        (error) => out({ id: request.id, ok: false, error: String(error?.data?.error || error?.message || error) }),
    );
});

// stdin closed (the test process went away) or `stop`: stop syncing and exit. Writes to
// a pipe are synchronous in Node on Linux, so every line printed so far is out.
lines.on("close", () => finish());

function finish() {
    client.stopClient();
    process.exit(0);
}
