"""The read-only operator dashboard (servers, classes, environments, boot timeline, live logs).

C{views} renders HTML from plain objects (pure); C{auth} is the login (password file, session
cookies); C{live} pushes changes to browsers over server-sent events; C{site} is the klein
application and C{service} the listener the tap adds.
"""
