"""A small wrapper over psycopg2 (libpq) for the benchmarks: autocommit
connections over the cluster's Unix socket whose query() returns rows as
text, the way psql prints them, and that count notifications.
"""
import select

import psycopg2
import psycopg2.extensions

PgError = psycopg2.Error

# every value as the text PostgreSQL sent: the benchmarks parse what they need
_RAW = psycopg2.extensions.new_type(
    (16, 20, 21, 23, 26, 114, 700, 701, 1082, 1114, 1184, 1186, 1700, 2950, 3802),
    "RAW_TEXT", lambda value, cursor: value)


class Conn:
    def __init__(self, sockdir, port, dbname, user, appname="saga bench"):
        self.conn = psycopg2.connect(host=sockdir, port=port, dbname=dbname, user=user,
                                     application_name=appname)
        self.conn.autocommit = True
        psycopg2.extensions.register_type(_RAW, self.conn)
        self.notifications = 0
        self.last_notification = None

    def close(self):
        try:
            self.conn.close()
        except psycopg2.Error:
            pass

    def query(self, sql):
        """Run SQL (one or several statements); the rows of the last one."""
        with self.conn.cursor() as cur:
            cur.execute(sql)
            rows = cur.fetchall() if cur.description is not None else []
        self._collect()
        return rows

    def value(self, sql):
        rows = self.query(sql)
        return rows[0][0] if rows else None

    def _collect(self):
        while self.conn.notifies:
            self.last_notification = self.conn.notifies.pop(0).payload
            self.notifications += 1

    def drain_notifications(self, timeout):
        """Wait up to timeout seconds for notifications; count them."""
        if select.select([self.conn], [], [], timeout)[0]:
            self.conn.poll()
        self._collect()
