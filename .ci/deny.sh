#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (advisories, licenses, bans, sources),
# offline: CI machines reach crates.io but not GitHub, so the RustSec advisory
# database comes from a snapshot copy instead of a fetch.
#
# Where the snapshot is looked for, first hit wins:
#   $ALEPH_ADVISORY_DB, ../shared/advisory-db, ../../shared/advisory-db,
#   /work/shared/advisory-db   (relative paths are from the repository root)
#
# cargo-deny reads each database from <db-path>/<name>-<hash of its URL>, must
# find a git repository there (it reads HEAD's commit time to judge freshness),
# and takes db-path only from its config file. So this script copies the
# read-only snapshot into a temporary db-path, commits it, and runs cargo-deny
# with a temporary copy of deny.toml whose db-path points there.
#
# Usage: .ci/deny.sh [check ...]   (default: advisories licenses bans sources)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The version this script and the db layout below were checked with.
CARGO_DENY_VERSION="${CARGO_DENY_VERSION:-0.20.2}"
# cargo-deny names the directory of the default database (db-urls unset,
# https://github.com/RustSec/advisory-db) after an XxHash64 of that URL.
DB_DIR_NAME="advisory-db-3157b0e258782691"
# cargo-deny's own default for --offline use; only reported, see below.
MAX_AGE_DAYS=90

checks=("$@")
if [[ ${#checks[@]} -eq 0 ]]; then
    checks=(advisories licenses bans sources)
fi

if ! cargo deny --version >/dev/null 2>&1; then
    echo "installing cargo-deny $CARGO_DENY_VERSION (takes several minutes)"
    cargo install --locked "cargo-deny@$CARGO_DENY_VERSION"
fi
echo "using $(cargo deny --version)"

db_src=""
for candidate in "${ALEPH_ADVISORY_DB:-}" ../shared/advisory-db ../../shared/advisory-db /work/shared/advisory-db; do
    if [[ -n "$candidate" && -d "$candidate/crates" ]]; then
        db_src="$(cd "$candidate" && pwd)"
        break
    fi
done
if [[ -z "$db_src" ]]; then
    echo "no RustSec advisory-db snapshot found: set ALEPH_ADVISORY_DB to a copy of it" >&2
    exit 2
fi
echo "advisory db snapshot: $db_src"

work="$(mktemp -d "${TMPDIR:-/tmp}/aleph-deny.XXXXXX")"
trap 'rm -rf "$work"' EXIT

db="$work/dbs/$DB_DIR_NAME"
mkdir -p "$work/dbs"
cp -R "$db_src" "$db"
# The snapshot is read-only (CI lays shared/ without write bits), and git needs
# to write .git inside the copy.
chmod -R u+w "$db"

# The commit carries the snapshot's date when SNAPSHOT.txt names one, so `git
# log` in the copy tells the truth about its age.
snap_date="$(grep -oE '[0-9]{4}-[0-9]{2}-[0-9]{2}' "$db/SNAPSHOT.txt" 2>/dev/null | head -n1 || true)"
if [[ ! -d "$db/.git" ]]; then
    (
        cd "$db"
        git init -q
        git add -A
        if [[ -n "$snap_date" ]]; then
            export GIT_AUTHOR_DATE="${snap_date}T00:00:00Z" GIT_COMMITTER_DATE="${snap_date}T00:00:00Z"
        fi
        git -c user.name=ci -c user.email=ci@localhost -c commit.gpgsign=false \
            commit -q -m "advisory-db snapshot${snap_date:+ of $snap_date}"
    )
fi

# cargo-deny's staleness test passes here whatever the snapshot's age (it also
# counts the mtime of the fresh .git/HEAD), so say plainly how old it is.
if [[ -n "$snap_date" ]]; then
    age_days=$(( ( $(date -u +%s) - $(date -u -d "$snap_date" +%s) ) / 86400 ))
    if (( age_days > MAX_AGE_DAYS )); then
        echo "WARNING: the advisory db snapshot is $age_days days old (from $snap_date): refresh shared/advisory-db" >&2
    else
        echo "advisory db snapshot is $age_days days old (from $snap_date)"
    fi
fi

# deny.toml with db-path replaced; everything else as committed.
sed -e '/^[[:space:]]*db-path[[:space:]]*=/d' \
    -e "/^\[advisories\]/a db-path = \"$work/dbs\"" \
    deny.toml > "$work/deny.toml"
grep -q "^db-path = \"$work/dbs\"" "$work/deny.toml" || {
    echo "deny.toml has no [advisories] section to point at the snapshot" >&2
    exit 2
}

# cargo-deny --offline reads crate manifests and license files from cargo's
# local registry cache; crates.io is reachable, so fill it first.
cargo fetch --locked --quiet

echo "== cargo deny check ${checks[*]}"
cargo deny --frozen --color never --config "$work/deny.toml" check "${checks[@]}"
