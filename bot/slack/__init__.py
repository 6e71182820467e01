"""Slack: the connection and its listeners (`platform`), what people typed
(`text`: rich_text blocks or mrkdwn decoded by purpose), thread history
(`history`), reading Slack's payloads (`parsing`), Block Kit cards (`blocks`)
and Markdown to mrkdwn (`format`).

Empty on purpose: importing one part (the formatter, in a test) does not load
slack-bolt; `bot/server.py` imports `bot.slack.platform` when Slack is configured.
"""
